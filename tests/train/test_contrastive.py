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


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("contrastive")
    return {"plain": _cache(root / "plain", _item), "same": _cache(root / "same", _item),
            "flipped": _cache(root / "flipped", _flipped), "short": _cache(root / "short", _item, n=N - 1)}


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


def _per_sample_plain(tr, batch, t, eps):
    """The plain loss of each sample alone (a batch of one)."""
    one = [{k: v[j:j + 1] for k, v in batch.items()} for j in range(len(t))]  # "id" is a list: sliced too
    with torch.no_grad():
        return torch.stack([tr.forward_loss(b, t[j:j + 1], eps[j:j + 1]) for j, b in enumerate(one)])


@pytest.mark.parametrize("kind", ["counterfactual", "batch"])
def test_identical_negatives_scale_each_conditioned_loss(caches, tmp_path, kind):
    """A negative identical to the sample (a counterfactual cache of the same images; in-batch negatives of
    a batch of one repeated row and noise) turns each conditioned sample's loss L into (1 - w) L and leaves
    dropped captions' L alone: the trainer's loss against per-sample plain losses of the same model."""
    torch.manual_seed(0)
    plain = _trainer(caches, tmp_path / "plain")
    extra = [f"flow.contrastive={kind}", "flow.contrastive_weight=0.25"]
    if kind == "counterfactual":
        extra.append(f'data.negative_cache="{caches["same"]}"')
    torch.manual_seed(0)
    tr = _trainer(caches, tmp_path / kind, *extra)
    tr.model.load_state_dict(plain.model.state_dict())
    rows = list(range(N)) if kind == "counterfactual" else [3] * N
    g = torch.Generator().manual_seed(1)
    t, eps = torch.rand(N, generator=g), torch.randn(N, 16, SIZE // 8, SIZE // 8, generator=g)
    if kind == "batch":  # the in-batch negative is another row's (image, noise): the same row and noise
        eps = eps[:1].expand(N, -1, -1, -1)
    seen = torch.zeros(2, dtype=torch.bool)  # rows with a dropped caption, rows with a caption: both checked
    for epoch in range(6):  # caption dropout is drawn per (epoch, row)
        plain.cache.set_epoch(epoch)
        tr.cache.set_epoch(epoch)
        batch = tr.load_batch(rows)
        dropped = batch["caption_index"] == 0
        seen |= torch.stack([dropped.any(), (~dropped).any()])
        each = _per_sample_plain(plain, plain.load_batch(rows), t, eps)
        with torch.no_grad():
            got = tr.forward_loss(batch, t, eps)
        want = (each * torch.where(dropped, 1.0, 0.75)).mean()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert seen.all()

def test_counterfactual_negatives_lower_the_loss_and_train(caches, tmp_path):
    """Other negatives subtract a positive term on conditioned rows; three steps train with finite loss."""
    torch.manual_seed(0)
    plain = _trainer(caches, tmp_path / "plain")
    torch.manual_seed(0)
    tr = _trainer(caches, tmp_path / "cf", "flow.contrastive=counterfactual", "flow.contrastive_weight=0.25",
                  f'data.negative_cache="{caches["flipped"]}"')
    tr.model.load_state_dict(plain.model.state_dict())
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
