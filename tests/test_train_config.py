"""Run configs load from YAML with strict validation and `key=value` overrides."""
import os
import pytest

from codis_lib.config import ConfigError
from codis_lib.run_config import (apply_overrides, load_run_config, parse_overrides, run_config_from_dict,
                                  run_config_names, without_retired_keys)


def test_packaged_configs_load_and_validate():
    names = run_config_names()
    assert {"pretrain_emoji", "pretrain_4m", "finetune_coco", "finetune_flickr"} <= set(names)
    emoji = load_run_config("pretrain_emoji", world_size=1)
    assert emoji.model.mode == "codis" and emoji.data.dataset == "emoji"
    paper = load_run_config("pretrain_4m", world_size=8)
    assert paper.train.batch_size == 64 and paper.train.epochs == 30 and paper.model.queue_size == 65536
    assert paper.train.optimizer.lr == pytest.approx(1e-4) and paper.train.optimizer.warmup_steps == 2000
    coco = load_run_config("finetune_coco", world_size=8)
    assert coco.model.vision.image_size == 384 and coco.train.optimizer.lr == pytest.approx(1e-5)
    assert coco.train.task == "finetune" and coco.train.epochs == 5
    flickr = load_run_config("finetune_flickr", world_size=8)
    assert flickr.train.epochs == 10 and flickr.train.eval.k_test == 128


def test_unknown_keys_are_listed_with_the_valid_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {preset: tiny}\ntrain:\n  batchsize: 8\n  optimizer: {lr: 1e-4, decay: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path, world_size=1)
    message = str(info.value)
    assert str(path) in message and "train.batchsize" in message and "batch_size" in message
    path.write_text("model: {preset: tiny}\ntrainer: {}\n")
    with pytest.raises(ConfigError, match="unknown section.*trainer"):
        load_run_config(path, world_size=1)


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs must be an integer"):
        run_config_from_dict({"model": {"preset": "tiny"}, "train": {"epochs": "three"}})
    with pytest.raises(ConfigError, match=r"train\.compile must be true or false"):
        run_config_from_dict({"model": {"preset": "tiny"}, "train": {"compile": "yes"}})
    with pytest.raises(ConfigError, match=r"train\.precision must be one of"):
        run_config_from_dict({"model": {"preset": "tiny"}, "train": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match=r"train\.batch_size: must be >= 1"):
        run_config_from_dict({"model": {"preset": "tiny"}, "train": {"batch_size": 0}})


def test_queue_not_divisible_by_the_global_batch_names_the_key():
    data = {"model": {"preset": "tiny", "queue_size": 256}, "train": {"batch_size": 32}}
    run_config_from_dict(data).validate_for_world(2)  # 256 = 4 x 64: fine
    with pytest.raises(ConfigError, match=r"model\.queue_size.*global batch 96.*train\.batch_size=32 x 3"):
        run_config_from_dict(data).validate_for_world(3)


def test_overrides_are_parsed_as_yaml_and_validated():
    parsed = parse_overrides(["train.batch_size=8", "train.optimizer.lr=1e-5", "train.compile=true",
                              "train.max_steps=null", "data.train_files=[a.json, b.json]"])
    assert parsed == {"train.batch_size": 8, "train.optimizer.lr": "1e-5", "train.compile": True,
                      "train.max_steps": None, "data.train_files": ["a.json", "b.json"]}
    run = load_run_config("pretrain_emoji", overrides=["train.batch_size=8", "train.optimizer.lr=1e-5",
                                                       "model.mode=albef"], world_size=1)
    assert run.train.batch_size == 8 and run.train.optimizer.lr == pytest.approx(1e-5) and run.model.mode == "albef"
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["train.batch_size"])
    with pytest.raises(ConfigError, match=r"train\.no_such_key"):
        load_run_config("pretrain_emoji", overrides=["train.no_such_key=1"], world_size=1)
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": {"epochs": 3}}, ["train.epochs.x=1"])


def test_augmentation_keys_are_validated_and_reach_the_dataset():
    from codis_lib.train.data import augmentation_options

    run = load_run_config("pretrain_emoji", overrides=["data.crop_scale=[0.5, 1.0]", "data.randaugment_ops=0"],
                          world_size=1)
    assert augmentation_options(run.data) == {"crop_scale": (0.5, 1.0), "randaugment_ops": 0,
                                              "randaugment_magnitude": 7}
    for bad, key in (("data.crop_scale=[0.6, 0.5]", "data.crop_scale"), ("data.crop_scale=[0.5]", "data.crop_scale"),
                     ("data.randaugment_ops=-1", "data.randaugment_ops"),
                     ("data.randaugment_magnitude=11", "data.randaugment_magnitude")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_run_config("pretrain_emoji", overrides=[bad], world_size=1)


def test_a_checkpoint_config_with_retired_keys_still_loads_but_a_new_config_may_not_use_them():
    stored = load_run_config("pretrain_emoji", world_size=1).to_dict()
    stored["train"].update(debug_nan_at_step=None, debug_nan_term="align")  # what older checkpoints hold
    with pytest.raises(ConfigError, match=r"train\.debug_nan_at_step"):
        run_config_from_dict(stored)
    assert run_config_from_dict(without_retired_keys(stored)).to_dict() == \
        load_run_config("pretrain_emoji", world_size=1).to_dict()


def test_round_trip_through_a_plain_dict():
    run = load_run_config("pretrain_emoji", world_size=1)
    again = run_config_from_dict(run.to_dict())
    assert again.to_dict() == run.to_dict()


def test_command_line_prints_the_resolved_config_and_rejects_bad_keys_with_status_2(capsys):
    from codis_lib.train.cli import finetune_main, pretrain_main

    assert pretrain_main(["--print-config", "--set", "train.epochs=2", "--output-dir", "runs/x"]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 2" in printed and "output_dir: runs/x" in printed and "preset" not in printed
    assert finetune_main(["--print-config"]) == 0
    assert "task: finetune" in capsys.readouterr().out
    assert pretrain_main(["--set", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    assert pretrain_main(["--config", "no_such_config"]) == 2
    assert "unknown config 'no_such_config'" in capsys.readouterr().err


def test_eval_splits_are_named_and_checked_per_dataset():
    from codis_lib.data.emoji_concepts import ALL_EVAL_SPLITS
    from codis_lib.run_config import EMOJI_EVAL_SPLITS

    assert EMOJI_EVAL_SPLITS == ALL_EVAL_SPLITS  # the names emoji_split_file accepts, kept here below the data layer
    assert load_run_config("pretrain_emoji", world_size=1).train.eval.splits == ["new_drawings", "new_style", "test"]
    assert load_run_config("finetune_emoji", world_size=1).train.eval.splits == ["new_drawings", "new_style", "test"]
    for name in ("pretrain_4m", "finetune_coco", "finetune_flickr"):
        assert load_run_config(name, world_size=8).train.eval.splits == ["test"], name
    emoji = {"model": {"preset": "tiny"}}
    assert run_config_from_dict(emoji).train.eval.splits == ["test"]  # the dataclass default, as before
    with pytest.raises(ConfigError, match=r"train\.eval\.splits: 'train' is not an evaluation split of emoji data; "
                                          r"valid: val, test, new_drawings"):
        run_config_from_dict({**emoji, "train": {"eval": {"splits": ["test", "train"]}}})
    with pytest.raises(ConfigError, match=r"train\.eval\.splits: 'test' is listed twice"):
        run_config_from_dict({**emoji, "train": {"eval": {"splits": ["test", "test"]}}})
    with pytest.raises(ConfigError, match=r"train\.eval\.splits: name at least one split"):
        run_config_from_dict({**emoji, "train": {"eval": {"splits": []}}})
    with pytest.raises(ConfigError, match=r"train\.eval\.splits\[0\] must be a string"):
        run_config_from_dict({**emoji, "train": {"eval": {"splits": [3]}}})
    # ALBEF JSON data: val and test, each needing its file when the run evaluates
    with pytest.raises(ConfigError, match=r"train\.eval\.splits: 'new_drawings' is not an evaluation split of "
                                          r"albef_json data; valid: val, test"):
        load_run_config("pretrain_4m", overrides=["train.eval.splits=[new_drawings]"], world_size=8)
    with pytest.raises(ConfigError, match=r"train\.eval\.splits: 'val' needs data\.val_file"):
        load_run_config("pretrain_4m", overrides=["train.eval.splits=[test, val]"], world_size=8)
    quiet = load_run_config("pretrain_4m", overrides=["train.eval.splits=[val]", "train.eval.at_end=false"],
                            world_size=8)
    assert quiet.train.eval.splits == ["val"]  # never evaluated, so no file is needed
    assert load_run_config("finetune_coco", overrides=["train.eval.splits=[val, test]"],
                           world_size=8).train.eval.splits == ["val", "test"]


def test_the_older_one_split_key_reads_as_a_one_element_list(recwarn):
    stored = load_run_config("pretrain_emoji", world_size=1).to_dict()
    del stored["train"]["eval"]["splits"]
    stored["train"]["eval"]["split"] = "val"  # what checkpoints written before train.eval.splits hold
    again = run_config_from_dict(stored)
    assert again.train.eval.splits == ["val"] and "split" not in again.to_dict()["train"]["eval"]
    assert run_config_from_dict(again.to_dict()).to_dict() == again.to_dict()
    # an override under the old name replaces the file's list, one under the new name replaces an old key
    assert load_run_config("pretrain_emoji", overrides=["train.eval.split=test"],
                           world_size=1).train.eval.splits == ["test"]
    assert run_config_from_dict(apply_overrides(stored, ["train.eval.splits=[new_drawings, val]"])).train.eval.splits \
        == ["new_drawings", "val"]
    assert load_run_config("pretrain_emoji", overrides=["train.eval.splits=test"],
                           world_size=1).train.eval.splits == ["test"]  # a bare name is a one-name list
    with pytest.raises(ConfigError, match=r"train\.eval\.split and train\.eval\.splits are both set"):
        run_config_from_dict({"model": {"preset": "tiny"}, "train": {"eval": {"split": "val", "splits": ["val"]}}})
    with pytest.raises(ConfigError, match=r"train\.eval\.splits: 'nope' is not an evaluation split"):
        run_config_from_dict({"model": {"preset": "tiny"}, "train": {"eval": {"split": "nope"}}})
    assert not recwarn.list  # read silently: every older checkpoint stores the key


def test_num_threads_is_a_number_auto_or_null_and_auto_measures_the_idle_cores(monkeypatch):
    from codis_lib.train import process

    assert load_run_config("pretrain_emoji", overrides=["train.num_threads=auto"], world_size=1).train.num_threads == "auto"
    assert load_run_config("pretrain_emoji", overrides=["train.num_threads=3"], world_size=1).train.num_threads == 3
    with pytest.raises(ConfigError, match=r"train\.num_threads must be an integer.* or must be one of 'auto'"):
        load_run_config("pretrain_emoji", overrides=["train.num_threads=many"], world_size=1)
    with pytest.raises(ConfigError, match=r"train\.num_threads: must be >= 1"):
        load_run_config("pretrain_emoji", overrides=["train.num_threads=0"], world_size=1)
    assert process.resolve_num_threads(3) == 3 and process.resolve_num_threads(None) is None
    measured = process.idle_cores(0.05)  # the real measurement: between 0 and the core count
    assert measured is None or 0.0 <= measured <= (os.cpu_count() or 1) + 1e-6
    for idle, threads in ((0.02, 1), (1.1, 1), (1.9, 2), (7.5, 4)):
        monkeypatch.setattr(process, "idle_cores", lambda interval_s=0.5, idle=idle: idle)
        assert process.resolve_num_threads("auto") == threads


@pytest.mark.parametrize("text, found", [("- just a list\n", "found list"), ("42\n", "found int"),
                                         ("a: [1, 2\nb: 3\n", "not valid YAML at line 2, column 2")])
def test_a_config_file_without_a_mapping_or_with_broken_yaml_is_one_line_naming_it(tmp_path, capsys, text, found):
    from codis_lib.config import load_model_config
    from codis_lib.train.cli import pretrain_main

    path = tmp_path / "mine.yaml"
    path.write_text(text)
    assert pretrain_main(["--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and found in err, err
    with pytest.raises(ConfigError, match=found) as error:  # the model config reads YAML the same way
        load_model_config(path)
    assert "\n" not in str(error.value)
