"""Contrastive flow matching (rectiflow.flow.contrastive, flow.contrastive): the objective's minimiser, the
trainer's loss against per-sample plain losses, the paired negative cache, and one-line refusals."""

import pytest
import torch

from conftest import SIZE, TINY_TOML, HashTextEncoder, PoolAutoEncoder, _item, overrides
from rectiflow.data.cache_writer import build_cache
from rectiflow.data.sources import ArraySource
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.flow import contrastive_loss
from rectiflow.flow.contrastive import optimum
from rectiflow.train.config import load_config
from rectiflow.train.trainer import Trainer

N = 8


def _cache(out, get, n=N):
    return build_cache(ArraySource(n, get, name="squares"), PoolAutoEncoder(), HashTextEncoder(), out,
                       size=SIZE, batch_size=8, shard_size=16)


def _flipped(i):
    """Row i of the squares with its image flipped left-right: the same id and captions, another image."""
    img, caps, sid = _item(i)
    return img[:, ::-1].copy(), caps, sid


def _half_flipped(i):
    """Even rows flipped, odd rows themselves (as `--counterfactual two-shape` keeps one-shape images)."""
    return _flipped(i) if i % 2 == 0 else _item(i)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("contrastive")
    return {"plain": _cache(root / "plain", _item), "same": _cache(root / "same", _item),
            "flipped": _cache(root / "flipped", _flipped), "half": _cache(root / "half", _half_flipped),
            "short": _cache(root / "short", _item, n=N - 1)}


def test_minimiser_is_the_target_moved_away_from_the_negative():
    """Gradient descent on ||v - u||^2 - w ||v - u~||^2 over a free v ends at (u - w u~) / (1 - w); rows
    marked unconditioned keep the plain minimiser u."""
    g = torch.Generator().manual_seed(0)
    u, u_neg = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    conditioned = torch.tensor([True, True, False, True])
    v = torch.zeros(4, 6, requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.2)
    for _ in range(500):
        opt.zero_grad()
        loss = contrastive_loss((v - u).pow(2).mean(1), (v - u_neg).pow(2).mean(1), 0.3, conditioned).sum()
        loss.backward()
        opt.step()
    want = torch.where(conditioned[:, None], optimum(u, u_neg, 0.3), u)
    torch.testing.assert_close(v.detach(), want, rtol=1e-4, atol=1e-5)


def _trainer(caches, out, *extra):
    cfg = load_config(TINY_TOML, overrides(caches["plain"], out, "model.preset=micro", "checkpoint.every=0",
                                           "data.caption_dropout=0.5", *extra))
    return Trainer(cfg)


def _plain_and(caches, tmp_path, *extra):
    """A plain trainer and one with `extra` (contrastive) settings, holding the same model weights."""
    plain = _trainer(caches, tmp_path / "plain")
    tr = _trainer(caches, tmp_path / "contrastive", "flow.contrastive_weight=0.25", *extra)
    tr.model.load_state_dict(plain.model.state_dict())
    return plain, tr


def _per_sample_plain(tr, batch, t, eps):
    """The plain loss of each sample alone (a batch of one)."""
    one = [{k: v[j:j + 1] for k, v in batch.items()} for j in range(len(t))]  # "id" is a list: sliced too
    with torch.no_grad():
        return torch.stack([tr.forward_loss(b, t[j:j + 1], eps[j:j + 1]) for j, b in enumerate(one)])


def test_identical_in_batch_negatives_scale_each_conditioned_loss(caches, tmp_path):
    """In-batch negatives of a batch of one repeated row and noise equal the sample: each conditioned
    sample's loss L becomes (1 - w) L, dropped captions' L stays: the trainer's loss against per-sample
    plain losses of the same model."""
    plain, tr = _plain_and(caches, tmp_path, "flow.contrastive=batch")
    rows = [3] * N
    g = torch.Generator().manual_seed(1)
    t, eps = torch.rand(N, generator=g), torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=g)
    eps = eps.expand(N, -1, -1, -1)  # the in-batch negative is another row's (image, noise): the same here
    seen = torch.zeros(2, dtype=torch.bool)  # a batch with the caption dropped, one with it: both checked
    for epoch in range(6):  # caption dropout is drawn per (epoch, row)
        plain.cache.set_epoch(epoch)
        tr.cache.set_epoch(epoch)
        batch = tr.load_batch(rows)
        dropped = batch["caption_index"] == 0
        seen |= torch.stack([dropped.any(), (~dropped).any()])
        each = _per_sample_plain(plain, plain.load_batch(rows), t, eps)
        with torch.no_grad():
            got = tr.forward_loss(batch, t, eps)
        torch.testing.assert_close(got, (each * torch.where(dropped, 1.0, 0.75)).mean(), rtol=1e-5, atol=1e-7)
    assert seen.all()


def test_counterfactual_rows_without_a_counterfactual_keep_the_plain_loss(caches, tmp_path):
    """A counterfactual cache whose odd rows are the images themselves: those rows and rows with a dropped
    caption keep exactly their plain loss; the other rows lose a positive term (row by row)."""
    plain, tr = _plain_and(caches, tmp_path, "flow.contrastive=counterfactual",
                           f'data.negative_cache="{caches["half"]}"')
    rows = list(range(N))
    g = torch.Generator().manual_seed(1)
    t, eps = torch.rand(N, generator=g), torch.randn(N, 16, SIZE // 8, SIZE // 8, generator=g)
    lowered = kept = 0
    for epoch in range(4):
        plain.cache.set_epoch(epoch)
        tr.cache.set_epoch(epoch)
        mine, theirs = _per_sample_plain(tr, tr.load_batch(rows), t, eps), \
            _per_sample_plain(plain, plain.load_batch(rows), t, eps)
        dropped = tr.load_batch(rows)["caption_index"] == 0
        for j in rows:
            if j % 2 or dropped[j]:
                torch.testing.assert_close(mine[j], theirs[j], rtol=1e-6, atol=0.0)
                kept += 1
            else:
                assert mine[j] < theirs[j]
                lowered += 1
    assert lowered and kept > lowered


def test_counterfactual_negatives_lower_the_loss_and_train(caches, tmp_path):
    """Other negatives subtract a positive term on conditioned rows; three steps train with finite loss."""
    plain, tr = _plain_and(caches, tmp_path, "flow.contrastive=counterfactual",
                           f'data.negative_cache="{caches["flipped"]}"')
    batch = tr.load_batch(list(range(N)))
    assert not torch.equal(batch["negative_latents"], batch["latents"])
    g = torch.Generator().manual_seed(1)
    t, eps = torch.rand(N, generator=g), torch.randn(N, 16, SIZE // 8, SIZE // 8, generator=g)
    with torch.no_grad():
        contrastive = float(tr.forward_loss(batch, t, eps))
        assert contrastive < float(plain.forward_loss(plain.load_batch(list(range(N))), t, eps))
    losses = [tr.train_step().loss for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_negative_cache_must_pair_with_the_cache(caches, tmp_path):
    with pytest.raises(RectiflowError, match="does not pair") as e:
        _trainer(caches, tmp_path / "a", "flow.contrastive=counterfactual", "flow.contrastive_weight=0.1",
                 f'data.negative_cache="{caches["short"]}"')
    assert "\n" not in str(e.value)
    with pytest.raises(RectiflowError, match="is data.cache itself"):
        _trainer(caches, tmp_path / "b", "flow.contrastive=counterfactual", "flow.contrastive_weight=0.1",
                 f'data.negative_cache="{caches["plain"]}"')


@pytest.mark.parametrize("extra, match", [
    (["flow.contrastive=delta"], "unknown flow.contrastive"),
    (["flow.contrastive=batch", "flow.contrastive_weight=1.0"], r"\[0, 1\)"),
    (["flow.contrastive=batch"], "needs flow.contrastive_weight > 0"),
    (["flow.contrastive_weight=0.1"], "flow.contrastive is 'none'"),
    (["flow.contrastive=counterfactual", "flow.contrastive_weight=0.1"], "go together"),
    (['data.negative_cache="x"'], "go together"),
    (["flow.contrastive=batch", "flow.contrastive_weight=0.1", 'distill.teacher="t.safetensors"'],
     "does not combine with distill.teacher"),
])
def test_bad_contrastive_settings_are_one_line(caches, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(TINY_TOML, overrides(caches["plain"], tmp_path, *extra))
    assert "\n" not in str(e.value)
