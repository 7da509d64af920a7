"""ITM re-ranking: the batched version equals ALBEF's one-query-at-a-time loop; query splits over ranks add up.

Real tiny CODIS (random init, eval mode) on the small emoji corpus built by tests/fixtures_data.
"""
import os

import pytest
import torch

from codis_lib.config import ModelConfig
from codis_lib.data.datasets import RetrievalEvalDataset
from codis_lib.data.tokenizer import load_tokenizer
from codis_lib.evaluation.retrieval import (
    dataset_features,
    evaluate_retrieval,
    itm_rerank_batched,
    itm_rerank_one_query_at_a_time,
    rerank_at_depth,
    retrieval_metrics,
)
from codis_lib.model import build_model
from tests.fixtures_data.corpus import SMALL_CORPUS_SIZE, small_emoji_corpus

K = 6  # fewer than the 15 test images, so the top k really cuts
FILL = -100.0


def _tiny_model(tokenizer, mode: str = "codis", seed: int = 0):
    torch.manual_seed(seed)
    config = ModelConfig.preset("tiny").with_tokenizer(tokenizer).with_overrides(
        {"vision.image_size": SMALL_CORPUS_SIZE, "mode": mode})
    return build_model(config).eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny fusion calls lose from a 2nd thread


@pytest.fixture(scope="module")
def setup(one_thread):
    corpus, _ = small_emoji_corpus()
    tokenizer = load_tokenizer(corpus / "tokenizer")
    dataset = RetrievalEvalDataset(corpus / "test.json", image_size=SMALL_CORPUS_SIZE)
    model = _tiny_model(tokenizer)
    features = dataset_features(model, dataset, tokenizer, image_batch_size=8, text_batch_size=16)
    return model, tokenizer, dataset, features


def test_rerank_at_smaller_depth_equals_reranking_there(setup):
    """Cutting a deep re-ranking to each query's top k gives what re-ranking at k gives, at every k."""
    model, _, _, features = setup
    deep = itm_rerank_batched(model, features, K, distributed=False)
    similarity = features.similarity_i2t()
    for k in (1, 3, K):
        direct = itm_rerank_batched(model, features, k, distributed=False)
        torch.testing.assert_close(rerank_at_depth(similarity, deep.scores_i2t, k), direct.scores_i2t,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(rerank_at_depth(similarity.t(), deep.scores_t2i, k), direct.scores_t2i,
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="depth below k"):
        rerank_at_depth(similarity, direct.scores_i2t, K + 1)  # re-ranked at K only

def test_batched_equals_one_query_at_a_time(setup):
    model, _, dataset, features = setup
    assert features.num_images == len(dataset) and features.num_texts == len(dataset.texts) > len(dataset)
    reference = itm_rerank_one_query_at_a_time(model, features, K, distributed=False)
    for options in ({"pair_batch_size": 7}, {"pair_batch_size": 1000},
                    {"pair_batch_size": 64, "share_image_tokens": False},
                    {"pair_batch_size": 64, "share_text_work": False, "first_token_only": False},
                    {"pair_batch_size": 5, "deduplicate": False, "trim_padding": False}):
        batched = itm_rerank_batched(model, features, K, distributed=False, **options)
        torch.testing.assert_close(batched.scores_i2t, reference.scores_i2t, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.scores_t2i, reference.scores_t2i, atol=1e-5, rtol=0)
        assert batched.pairs_requested == reference.pairs_requested == K * (features.num_images + features.num_texts)
    # shared pairs are scored once, and the metrics computed from both agree
    assert batched.pairs_scored == batched.pairs_requested  # deduplicate=False in the last options
    deduplicated = itm_rerank_batched(model, features, K, pair_batch_size=64, distributed=False)
    assert deduplicated.pairs_scored < deduplicated.pairs_requested
    assert retrieval_metrics(deduplicated.scores_i2t, deduplicated.scores_t2i, dataset.txt2img, dataset.img2txt) == \
        pytest.approx(retrieval_metrics(reference.scores_i2t, reference.scores_t2i, dataset.txt2img, dataset.img2txt))


def test_scores_sit_in_each_querys_top_k_and_equal_a_direct_fusion_pass(setup):
    model, _, _, features = setup
    result = itm_rerank_batched(model, features, K, pair_batch_size=9, distributed=False)
    similarity = features.image_feat @ features.text_feat.t()  # (num_images, num_texts)
    for scores, sims in ((result.scores_i2t, similarity), (result.scores_t2i, similarity.t())):
        rescored = scores != FILL
        assert (rescored.sum(dim=1) == K).all()
        # the rescored candidates are exactly the contrastive top k of each query
        top = sims.topk(K, dim=1).indices
        assert torch.equal(rescored, torch.zeros_like(rescored).scatter_(1, top, True))
    # an independent fusion pass on single pairs, straight through the model's public API
    image, text = 3, int(torch.nonzero(result.scores_i2t[3] != FILL)[0])
    with torch.no_grad():
        direct = model.itm_logits(features.image_embeds[image:image + 1], features.text_embeds[text:text + 1],
                                  features.text_attention_mask[text:text + 1])[0, 1]
    assert float(result.scores_i2t[image, text]) == pytest.approx(float(direct), abs=1e-5)


def test_itm_plus_sim_adds_the_contrastive_similarity(setup):
    model, _, _, features = setup
    itm_only = itm_rerank_batched(model, features, K, pair_batch_size=50, distributed=False)
    combined = itm_rerank_batched(model, features, K, pair_batch_size=50, score_mode="itm_plus_sim",
                                  distributed=False)
    reference = itm_rerank_one_query_at_a_time(model, features, K, score_mode="itm_plus_sim", distributed=False)
    torch.testing.assert_close(combined.scores_i2t, reference.scores_i2t, atol=1e-5, rtol=0)
    rescored = itm_only.scores_i2t != FILL
    similarity = features.image_feat @ features.text_feat.t()
    torch.testing.assert_close(combined.scores_i2t[rescored], itm_only.scores_i2t[rescored] + similarity[rescored],
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="score_mode must be one of"):
        itm_rerank_batched(model, features, K, score_mode="itm+sim", distributed=False)


@pytest.mark.parametrize("world_size", [2, 3])
def test_query_shares_of_all_ranks_sum_to_the_full_matrices(setup, world_size):
    model, _, _, features = setup
    full = itm_rerank_batched(model, features, K, pair_batch_size=16, distributed=False)
    shares = [itm_rerank_batched(model, features, K, pair_batch_size=16, query_split=(rank, world_size))
              for rank in range(world_size)]
    for share in shares:  # every row belongs to one rank: zero elsewhere
        owned_rows = (share.scores_i2t != 0).any(dim=1)
        assert 0 < int(owned_rows.sum()) < features.num_images
    torch.testing.assert_close(sum(s.scores_i2t for s in shares), full.scores_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(sum(s.scores_t2i for s in shares), full.scores_t2i, atol=1e-5, rtol=0)


def _distributed_worker(rank: int, world_size: int, port: int, corpus: str, result_file: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        tokenizer = load_tokenizer(os.path.join(corpus, "tokenizer"))
        dataset = RetrievalEvalDataset(os.path.join(corpus, "test.json"), image_size=SMALL_CORPUS_SIZE)
        model = _tiny_model(tokenizer)
        evaluation = evaluate_retrieval(model, dataset, tokenizer, k=K, pair_batch_size=16, image_batch_size=8)
        if rank == 0:
            torch.save({"scores_i2t": evaluation.rerank.scores_i2t, "scores_t2i": evaluation.rerank.scores_t2i,
                        "metrics": evaluation.metrics}, result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_result(setup, tmp_path):
    import socket

    import torch.multiprocessing as mp

    model, tokenizer, dataset, _ = setup
    corpus, _ = small_emoji_corpus()
    single = evaluate_retrieval(_tiny_model(tokenizer), dataset, tokenizer, k=K, pair_batch_size=16,
                                image_batch_size=8, distributed=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result_file = tmp_path / "rank0.pt"
    mp.start_processes(_distributed_worker, args=(2, port, str(corpus), str(result_file)), nprocs=2,
                       start_method="spawn")
    result = torch.load(result_file)
    torch.testing.assert_close(result["scores_i2t"], single.rerank.scores_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(result["scores_t2i"], single.rerank.scores_t2i, atol=1e-5, rtol=0)
    assert result["metrics"]["itm"] == pytest.approx(single.metrics["itm"])
    assert result["metrics"]["itc"] == pytest.approx(single.metrics["itc"])


def test_evaluate_retrieval_end_to_end_and_clip_mode_skips_reranking(setup):
    model, tokenizer, dataset, features = setup
    evaluation = evaluate_retrieval(model, dataset, tokenizer, k=K, pair_batch_size=32, image_batch_size=8,
                                    distributed=False)
    summary = evaluation.to_dict()
    assert summary["num_images"] == len(dataset) and summary["num_texts"] == len(dataset.texts)
    assert set(summary["metrics"]) == {"itc", "itm"} and summary["headline"] == summary["metrics"]["itm"]
    for metrics in summary["metrics"].values():
        assert all(0.0 <= value <= 100.0 for value in metrics.values())
        assert metrics["txt_r1"] <= metrics["txt_r5"] <= metrics["txt_r10"]
    # the contrastive metrics are those of the similarity matrix itself
    similarity = features.image_feat @ features.text_feat.t()
    assert summary["metrics"]["itc"] == pytest.approx(
        retrieval_metrics(similarity, similarity.t(), dataset.txt2img, dataset.img2txt))
    clip = _tiny_model(tokenizer, mode="clip")
    clip_evaluation = evaluate_retrieval(clip, dataset, tokenizer, k=K, image_batch_size=8, distributed=False)
    assert clip_evaluation.metrics["itm"] is None and clip_evaluation.rerank is None
    assert clip_evaluation.headline == clip_evaluation.metrics["itc"]


def test_fill_value_must_stay_below_every_itm_score(setup):
    model, _, _, features = setup
    with pytest.raises(ValueError, match="fill_value"):
        itm_rerank_batched(model, features, K, fill_value=1e6, distributed=False)
