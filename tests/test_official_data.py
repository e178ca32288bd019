"""The official LLaVA-Reward data files read by `load_preferences`: the published samples (copied under
tests/fixtures/official_data with the repository's layout) keep every row; ratings, ties and two-prompt rows;
paths written on another machine mapped with `path_map`; a clear error when every image is missing; the options
reaching `rlhf eval reward`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from reward.data import BadRowWarning, PairExample, load_preferences

REPO = Path(__file__).parent / "fixtures" / "official_data"  # stands for the official repository's root
SAMPLES = REPO / "data" / "sample_test"
PROMPT = ("perfect white haired egyptian goddess wearing white dove wings, warframe armor, regal, attractive, ornate, "
          "sultry, beautiful, ice queen, half asian, pretty face, blue eyes, detailed, scifi platform, 4 k, ultra "
          "realistic, epic lighting, illuminated, cinematic, masterpiece, art by akihito tsukushi, voidstar ")


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


def test_published_pairwise_sample_keeps_every_row_with_its_ratings():
    data = load_preferences(SAMPLES / "pairwise_sample.json", image_root=REPO)
    assert data.summary() == {"source": str(SAMPLES / "pairwise_sample.json"), "kind": "llava_reward",
                              "rows_read": 4, "pairs": 4, "tie_pairs": 0, "dropped_ties": 0, "labels": 0,
                              "skipped": 0}
    assert [(p.position, p.chosen.path.name, p.rejected.path.name, p.chosen_rating, p.rejected_rating)
            for p in data.pairs] == [
        (0, "0_1_id_000904-0035.jpg", "4_3_id_000904-0035.jpg", 7.0, 6.0),
        (1, "0_1_id_000904-0035.jpg", "5_4_id_000904-0035.jpg", 7.0, 6.0),
        (2, "0_1_id_000904-0035.jpg", "6_4_id_000904-0035.jpg", 7.0, 4.0),
        (3, "1_2_id_000904-0035.jpg", "4_3_id_000904-0035.jpg", 7.0, 6.0)]
    # each row gives [chosen prompt, rejected prompt]; both are kept
    assert all((p.prompt, p.rejected_prompt, p.tie) == (PROMPT, PROMPT, False) for p in data.pairs)
    assert data.pairs[0].chosen.load().mode == "RGB"


def test_published_classification_sample_keeps_every_row():
    data = load_preferences(SAMPLES / "non_pairwise_sample.json", image_root=REPO)
    assert (data.kind, len(data.labels), data.skipped) == ("llava_reward", 4, [])
    assert [(ex.image.path.name, ex.label) for ex in data.labels] == [
        ("0_c.jpg", 1), ("0_r.jpg", 1), ("1_c.jpg", 1), ("1_r.jpg", 1)]
    assert data.labels[2].prompt.startswith("A close-up photograph of a fat orange cat")


def test_ratings_ties_prompts_and_extra_keys(tmp_path):
    for name, colour in [("a.png", "red"), ("b.png", "blue")]:
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    pair = {"prompt_id": "1", "chosen_path": "a.png", "reject_path": "b.png"}
    source = write_json(tmp_path / "pairs.json", [
        {**pair, "prompt": "rated", "c_rate": 5, "r_rate": 2.5},
        {**pair, "prompt": "equal ratings", "c_rate": 3, "r_rate": 3},
        {**pair, "prompt": ["for the chosen", "for the rejected"], "c_rate": 4, "r_rate": 1},
        {**pair, "prompt": "unrated"},
        {**pair, "prompt": "half rated", "c_rate": 4},
        {**pair, "prompt": ["one", "two", "three"], "c_rate": 4, "r_rate": 1},
        {**pair, "prompt": "text rating", "c_rate": "high", "r_rate": 1},
        {"prompt": "unsafe", "path": "b.png", "label": 0, "safety_label": "Unsafe", "category": "Hate",
         "source": "Laion5B"},
        {"prompt": "", "path": "a.png", "label": 1},
    ])

    with pytest.warns(BadRowWarning, match="skipped 3 of 9"):
        data = load_preferences(source)
    assert data.kind == "llava_reward"
    assert [(p.prompt, p.rejected_prompt, p.chosen_rating, p.rejected_rating, p.tie) for p in data.pairs] == [
        ("rated", None, 5.0, 2.5, False), ("equal ratings", None, 3.0, 3.0, True),
        ("for the chosen", "for the rejected", 4.0, 1.0, False), ("unrated", None, None, None, False)]
    assert dict(data.skipped) == {
        4: "missing key 'r_rate'",
        5: "wrong type: 'prompt' must be a string or a list of two strings [chosen prompt, rejected prompt]",
        6: "wrong type: 'c_rate' must be a number, got 'high'"}
    assert [(ex.prompt, ex.label, ex.position) for ex in data.labels] == [("unsafe", 0, 7), ("", 1, 8)]

    with pytest.warns(BadRowWarning):
        dropped = load_preferences(source, ties="drop")
    assert dropped.dropped_ties == 1 and "equal ratings" not in [p.prompt for p in dropped.pairs]


def test_path_map_points_foreign_absolute_paths_to_a_local_folder(tmp_path):
    local = tmp_path / "unsafe_bench_img"
    local.mkdir()
    for name in ("0.jpg", "1.jpg"):
        shutil.copy(SAMPLES / "sample_img" / "0_c.jpg", local / name)
    (tmp_path / "other" / "unsafe_bench_img2").mkdir(parents=True)
    shutil.copy(SAMPLES / "sample_img" / "1_c.jpg", tmp_path / "other" / "unsafe_bench_img2" / "2.jpg")
    source = write_json(tmp_path / "Unsafebench_train.json", [
        {"path": "/scr/shijie/hf/data/unsafe_bench_img/0.jpg", "label": 1, "prompt": "a", "category": "Hate"},
        {"path": "/scr/shijie/hf/data/unsafe_bench_img/1.jpg", "label": 0, "prompt": "b", "category": "Hate"},
        {"path": "/scr/shijie/hf/data/unsafe_bench_img2/2.jpg", "label": 0, "prompt": "c", "category": "Hate"},
    ])
    # the longest prefix wins; a prefix matches whole path components only (".../unsafe_bench_img2" is not
    # under ".../unsafe_bench_img")
    data = load_preferences(source, path_map={"/scr/shijie/hf/data/unsafe_bench_img/": local,
                                              "/scr/shijie/hf/data": tmp_path / "other"})
    assert [ex.image.path for ex in data.labels] == [
        local / "0.jpg", local / "1.jpg", tmp_path / "other" / "unsafe_bench_img2" / "2.jpg"]
    with pytest.raises(ValueError, match="path_map must map"):
        load_preferences(source, path_map=[("/scr", str(tmp_path))])


def test_every_image_missing_is_an_error_naming_the_first_file(tmp_path):
    source = write_json(tmp_path / "pairs.json", [
        {"prompt": "p", "chosen_path": "/scr/shijie/hf/data/img/0.jpg", "reject_path": "/scr/x/1.jpg",
         "c_rate": 2, "r_rate": 1},
        {"prompt": "p", "chosen_path": "/scr/shijie/hf/data/img/2.jpg", "reject_path": "/scr/x/3.jpg",
         "c_rate": 2, "r_rate": 1},
    ])
    with pytest.raises(ValueError, match=r"no usable row .* The first missing image file is "
                                         r"/scr/shijie/hf/data/img/0\.jpg; .*path_map="):
        load_preferences(source)
    # relative paths resolved against the wrong folder: the error shows where they were looked for
    with pytest.raises(ValueError, match=r"first missing image file is .*sample_test/data/sample_test/sample_img/0_c"):
        load_preferences(SAMPLES / "non_pairwise_sample.json")


def test_rejected_prompt_reaches_training_batches_and_eval_options_parse(tmp_path):
    from rlhf.config import parse_config
    from trainers.reward_model import RewardEvalScript, collate_preferences

    pairs = load_preferences(SAMPLES / "pairwise_sample.json", image_root=REPO).pairs[:2]
    own = PairExample("chosen text", pairs[0].chosen, pairs[0].rejected, rejected_prompt="rejected text")
    batch = collate_preferences([own, pairs[1]])
    assert batch["prompts"] == ["chosen text", PROMPT, "rejected text", PROMPT]

    (config,) = parse_config(RewardEvalScript, ["--data", "x.json", "--image_root", str(REPO),
                                                "--path_map", '{"/scr/shijie/hf/data": "/data"}'])
    assert (config.image_root, config.path_map) == (str(REPO), {"/scr/shijie/hf/data": "/data"})


def test_eval_reward_command_reads_the_published_sample(tiny_vlm_paths, tmp_path):
    from reward.model import RewardModel
    from trainers.reward_model import eval_main

    RewardModel.from_backbone(tiny_vlm_paths["llava_next"], ["overall"], lora_r=4).save_pretrained(tmp_path / "rm")
    eval_main(["--model", str(tmp_path / "rm"), "--data", str(SAMPLES / "pairwise_sample.json"),
               "--image_root", str(REPO), "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["overall"]
    assert (metrics["data"]["pairs"], metrics["data"]["skipped"]) == (4, 0)
