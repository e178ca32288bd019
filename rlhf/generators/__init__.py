"""Fine-tunable text-to-image generators behind one interface (`GeneratorAdapter`), one module per family."""

from rlhf.generators.base import GeneratorAdapter, StepResult

__all__ = ["GeneratorAdapter", "StepResult"]
