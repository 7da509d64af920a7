"""codis-eval: our checkpoints and ALBEF-format checkpoints through the same evaluation, the poster-layout table."""
import json

import pytest
import torch

from codis_lib.config import ModelConfig
from codis_lib.data.datasets import RetrievalEvalDataset
from codis_lib.data.tokenizer import load_tokenizer
from codis_lib.evaluation.albef_models import albef_state_dict, export_albef_checkpoint, load_albef_model
from codis_lib.evaluation.cli import eval_main, run_evaluation
from codis_lib.evaluation.report import format_evaluation_table
from codis_lib.evaluation.paper import PAPER_RESULTS, format_poster_markdown, paper_rows
from codis_lib.evaluation.retrieval import evaluate_retrieval
from codis_lib.model import build_model
from codis_lib.run_config import load_run_config
from codis_lib.train.engine import train
from tests.fixtures_data.corpus import SMALL_CORPUS_SIZE, small_emoji_corpus


def assert_same_metrics(left: dict, right: dict) -> None:
    assert set(left) == set(right)
    for ranking in left:
        assert (left[ranking] is None) == (right[ranking] is None), ranking
        if left[ranking] is not None:
            assert left[ranking] == pytest.approx(right[ranking]), ranking


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny fusion calls lose from a 2nd thread


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, one_thread):
    """A 2-step tiny CODIS run on the small emoji corpus, saved by the real trainer."""
    corpus, _ = small_emoji_corpus()
    run_dir = tmp_path_factory.mktemp("run")
    overrides = {"data.root": str(corpus), "model.vision.image_size": SMALL_CORPUS_SIZE, "model.queue_size": 32,
                 "train.batch_size": 8, "train.max_steps": 2, "train.eval.at_end": False, "train.tensorboard": False,
                 "train.progress": False, "train.output_dir": str(run_dir), "train.num_threads": 1}
    result = train(load_run_config("pretrain_emoji", overrides=[f"{k}={v}" for k, v in overrides.items()]))
    return result.checkpoint


def test_codis_eval_on_our_checkpoint_prints_the_poster_table_and_writes_json(trained_checkpoint, tmp_path, capsys):
    corpus, _ = small_emoji_corpus()
    out = tmp_path / "eval.json"
    status = eval_main([str(trained_checkpoint), "--annotation", str(corpus / "test.json"), "--k", "5",
                        "--pair-batch-size", "64", "--json", str(out), "--paper", "flickr", "--device", "cpu"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "Text Retrieval" in printed and "Image Retrieval" in printed
    assert "ALBEF 4M (paper, Flickr30K (1K))" in printed and "this run, ITM re-ranked (k=5)" in printed
    assert "90.5" in printed  # the poster's ALBEF 4M zero-shot Flickr TR R@1
    result = json.loads(out.read_text())
    assert result["num_images"] == 15 and result["num_texts"] == 50 and result["k"] == 5
    assert result["headline"] == result["metrics"]["itm"]
    assert 0 <= result["headline"]["txt_r1"] <= result["headline"]["txt_r10"] <= 100
    # the default dataset is the test split of the checkpoint's own run: the same numbers
    again = run_evaluation(trained_checkpoint, k=5, pair_batch_size=64, device="cpu")
    assert_same_metrics(again["metrics"], result["metrics"])


def test_albef_export_round_trip_gives_the_same_scores(tmp_path):
    corpus, _ = small_emoji_corpus()
    tokenizer = load_tokenizer(corpus / "tokenizer")
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny").with_tokenizer(tokenizer).with_overrides(
        {"vision.image_size": SMALL_CORPUS_SIZE, "mode": "albef"})
    ours = build_model(config).eval()
    checkpoint, config_file = export_albef_checkpoint(ours, tmp_path / "albef_tiny_emoji.pth")
    stored = torch.load(checkpoint, weights_only=True)["model"]
    assert not any(key.startswith("codebook.") for key in stored) and "idx_queue" not in stored
    assert torch.equal(stored["text_encoder.bert.embeddings.position_ids"][0],
                       torch.arange(config.text.max_position_embeddings))
    loaded = load_albef_model(checkpoint, task_config=config_file, tokenizer=corpus / "tokenizer")
    assert "pretrain layout" in loaded.description
    # every ALBEF tensor arrived unchanged (queues excepted: evaluation starts them fresh)
    reloaded = loaded.model.state_dict()
    for key, value in albef_state_dict(ours).items():
        if key.endswith("position_ids") or key in ("image_queue", "text_queue", "queue_ptr"):
            continue
        assert torch.equal(reloaded[key], value), key
    dataset = RetrievalEvalDataset(corpus / "test.json", image_size=SMALL_CORPUS_SIZE)
    direct = evaluate_retrieval(ours, dataset, tokenizer, k=5, pair_batch_size=64, distributed=False)
    via_albef = evaluate_retrieval(loaded.model, dataset, loaded.tokenizer, k=5, pair_batch_size=64,
                                   distributed=False)
    torch.testing.assert_close(via_albef.rerank.scores_i2t, direct.rerank.scores_i2t, atol=1e-6, rtol=0)
    assert_same_metrics(via_albef.metrics, direct.metrics)
    # and through the command line, as a user with ALBEF_4M.pth would run it
    assert eval_main(["--albef-checkpoint", str(checkpoint), "--albef-config", str(config_file), "--tokenizer",
                      str(corpus / "tokenizer"), "--annotation", str(corpus / "test.json"), "--k", "5",
                      "--json", str(tmp_path / "albef.json"), "--device", "cpu"]) == 0
    assert_same_metrics(json.loads((tmp_path / "albef.json").read_text())["metrics"], direct.metrics)


def test_bad_arguments_get_clear_errors(tmp_path, capsys):
    assert eval_main([]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert eval_main([str(tmp_path / "missing.pt"), "--device", "cpu"]) == 2
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--annotation is required"):
        from codis_lib.evaluation.cli import load_dataset

        load_dataset(None, None, 32, run_config=None)
    with pytest.raises(ValueError, match="setting must be one of"):
        paper_rows("zero shot", "coco")


def test_paper_numbers_and_table_layout():
    # a few cells of the poster, re-typed here as a check on the transcription
    assert PAPER_RESULTS["zero-shot"]["coco"]["CODIS"]["txt_r1"] == 71.5
    assert PAPER_RESULTS["zero-shot"]["flickr"]["ALBEF 4M"]["img_r10"] == 96.7
    assert PAPER_RESULTS["fine-tuned"]["coco"]["ALBEF 4M"]["img_r1"] == 56.8
    assert PAPER_RESULTS["fine-tuned"]["flickr"]["CODIS"]["txt_r10"] == 99.9
    row = PAPER_RESULTS["zero-shot"]["coco"]["CODIS"]
    assert row["r_mean"] == pytest.approx((71.5 + 91.1 + 95.5 + 53.9 + 79.5 + 87.1) / 6)
    result = {"metrics": {"itc": dict(row), "itm": None}, "k": 0, "num_images": 3, "num_texts": 6}
    table = format_evaluation_table(result, paper="coco")
    assert table.splitlines()[0].strip().startswith("Text Retrieval")
    assert "this run, contrastive only" in table and "ITM re-ranked" not in table
    assert format_poster_markdown({"x": row}).splitlines()[2] == \
        "| x | 71.5 | 91.1 | 95.5 | 53.9 | 79.5 | 87.1 | 79.8 |"


def test_weights_teacher_scores_the_ema_teacher(trained_checkpoint, tmp_path, capsys):
    """--weights teacher puts the checkpoint's EMA teacher into the student's code paths, and says so."""
    from codis_lib.checkpoint import load_checkpoint
    from codis_lib.evaluation.models import load_trained_model

    stored = load_checkpoint(trained_checkpoint)["model"]
    teacher = load_trained_model(trained_checkpoint, weights="teacher").model
    student = load_trained_model(trained_checkpoint).model
    for name in ("visual_encoder", "vision_proj", "text_encoder", "text_proj"):
        for key, value in getattr(teacher, name).state_dict().items():
            assert torch.equal(value, stored[f"{name}_m.{key}"]), f"{name}.{key}"
    moved = [key for key, value in student.visual_encoder.state_dict().items()
             if not torch.equal(value, stored[f"visual_encoder_m.{key}"])]
    assert moved, "after 2 steps the student and its EMA teacher should differ"

    corpus, _ = small_emoji_corpus()
    out = tmp_path / "teacher.json"
    assert eval_main([str(trained_checkpoint), "--weights", "teacher", "--annotation", str(corpus / "test.json"),
                      "--k", "5", "--rerank", "no", "--device", "cpu", "--json", str(out)]) == 0
    assert "EMA teacher weights" in capsys.readouterr().out
    dataset = RetrievalEvalDataset(corpus / "test.json", image_size=SMALL_CORPUS_SIZE)
    by_hand = evaluate_retrieval(teacher, dataset, load_tokenizer(trained_checkpoint.parent / "tokenizer"),
                                 rerank=False).to_dict()
    assert_same_metrics(json.loads(out.read_text())["metrics"], by_hand["metrics"])

    with pytest.raises(ValueError, match="'student' or 'teacher'"):
        load_trained_model(trained_checkpoint, weights="ema")
    assert eval_main(["--albef-checkpoint", str(trained_checkpoint), "--weights", "teacher"]) == 2
    assert "--weights teacher" in capsys.readouterr().err


def test_copy_teacher_to_student_needs_a_teacher():
    model = build_model(ModelConfig.preset("tiny").with_overrides({"mode": "clip"}))
    with pytest.raises(ValueError, match="clip model has no EMA teacher"):
        model.copy_teacher_to_student()


def test_albef_export_refuses_a_model_whose_image_tower_is_not_a_vit(tmp_path):
    corpus, _ = small_emoji_corpus()
    config = ModelConfig.preset("tiny").with_tokenizer(load_tokenizer(corpus / "tokenizer")).with_overrides(
        {"vision.image_size": SMALL_CORPUS_SIZE, "vision.backbone": "efficientnet_lite0"})
    with pytest.raises(ValueError, match=r"^ALBEF's checkpoint format holds a ViT .* efficientnet_lite0 "
                                         r"\(model\.vision\.backbone\)$"):
        export_albef_checkpoint(build_model(config), tmp_path / "albef.pth")
    assert not (tmp_path / "albef.pth").exists()
