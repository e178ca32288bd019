"""Training loops on accelerate: the reward model, DDPO, Diffusion-DPO, AlignProp/DRaFT."""
