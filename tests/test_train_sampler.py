"""The global-batch sampler and per-sample seeds make the data independent of the process split."""
import torch

from codis_lib.train.sampler import GlobalBatchSampler, SeededItems, sample_seed, sample_seeds


class _Indices(torch.utils.data.Dataset):
    """Item i is i (the sampler only needs a length)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index


def _batches(sampler, batch_size):
    order = list(iter(sampler))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def test_two_ranks_reassemble_the_single_process_global_batches_in_order():
    dataset = _Indices(53)
    single = GlobalBatchSampler(dataset, batch_size=8, num_replicas=1, rank=0, seed=3)
    ranks = [GlobalBatchSampler(dataset, batch_size=4, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for epoch in (0, 1):
        for sampler in [single, *ranks]:
            sampler.set_epoch(epoch)
        single_batches = _batches(single, 8)
        rank_batches = [_batches(s, 4) for s in ranks]
        assert len(single_batches) == 6 == single.batches_per_epoch  # 53 // 8, the partial batch dropped
        for step, global_batch in enumerate(single_batches):
            assert rank_batches[0][step] + rank_batches[1][step] == global_batch  # rank order = dataset order
    epoch0 = (single.set_epoch(0), list(iter(single)))[1]
    epoch1 = (single.set_epoch(1), list(iter(single)))[1]
    assert epoch0 != epoch1  # a new shuffle each epoch ...
    assert (single.set_epoch(0), list(iter(single)))[1] == epoch0  # ... reproducible from (seed, epoch)


def test_resume_skips_the_batches_already_seen_and_accumulation_rounds_down():
    dataset = _Indices(100)
    sampler = GlobalBatchSampler(dataset, batch_size=5, num_replicas=2, rank=1, seed=0, batches_multiple_of=3)
    assert sampler.batches_per_epoch == 9  # 100 // 10 = 10 global batches, rounded down to a multiple of 3
    sampler.set_epoch(4)
    full = list(iter(sampler))
    sampler.set_start_batch(6)
    assert list(iter(sampler)) == full[6 * 5:] and len(sampler) == 15


def test_sample_seeds_depend_only_on_seed_epoch_and_index():
    seeds = sample_seeds(7, 2, torch.tensor([5, 9, 5]))
    assert seeds.dtype == torch.int64 and seeds[0] == seeds[2] and seeds[0] != seeds[1]
    assert int(seeds[0]) == sample_seed(7, 2, 5) >= 0
    assert sample_seed(7, 3, 5) != sample_seed(7, 2, 5) != sample_seed(8, 2, 5)
    assert sample_seed(7, 2, 5, stream=1) != sample_seed(7, 2, 5, stream=0)
    assert len({sample_seed(0, 0, i) for i in range(10_000)}) == 10_000


class _RandomItems(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.rand(3)  # global-generator randomness, as the augmentations draw it


def test_seeded_items_are_reproducible_and_leave_the_global_stream_alone():
    items = SeededItems(_RandomItems(), seed=1)
    torch.manual_seed(123)
    first = items[4]
    after = torch.rand(1)
    torch.manual_seed(999)
    assert torch.equal(items[4], first)  # the item does not depend on the caller's generator state
    torch.manual_seed(123)
    items[7]
    assert torch.equal(torch.rand(1), after)  # loading an item does not consume the caller's stream
    items.set_epoch(1)
    assert not torch.equal(items[4], first)  # a new epoch draws new augmentations


def test_seeded_batch_of_a_plain_dataset_is_its_items_one_at_a_time():
    items = SeededItems(_RandomItems(), seed=1)
    together = items.__getitems__([4, 7, 4])
    assert all(torch.equal(a, items[i]) for a, i in zip(together, [4, 7, 4]))
