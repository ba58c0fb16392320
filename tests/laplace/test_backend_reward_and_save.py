"""CurvkitGGN/CurvkitEF in the two laplace-torch 0.3 cases of issue 16, side by side with
laplace-torch's own backends (float64):

* ``likelihood="reward_modeling"``: preference pairs ``(B, 2, D)``, the model scoring each
  member. Fed as a weight-sharing axis, or folded into the layer's batch (``(2B, D)``) — the
  latter used to give a ``diag`` of twice the parameter count;
* ``torch.save`` / ``torch.load`` of a fitted (subnetwork) Laplace object — used to fail on
  the registry's unpicklable validators.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")
from laplace import DiagLaplace, FullLaplace, KronLaplace, Laplace  # noqa: E402
from laplace.curvature import BackPackGGN, CurvlinopsEF, CurvlinopsGGN  # noqa: E402
from laplace.utils import LargestMagnitudeSubnetMask  # noqa: E402

from curvkit.laplace import CurvkitEF, CurvkitGGN  # noqa: E402

DT = torch.float64


class PairScorer(nn.Module):
    """A reward model: one score per member of a preference pair, ``(B, 2, D) -> (B, 2)``."""

    def __init__(self, fold_pairs: bool) -> None:
        super().__init__()
        self.fold_pairs = fold_pairs
        self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_pairs:  # the pair members become rows of the layers' batch: (2B, D)
            return self.net(x.reshape(-1, x.shape[-1])).view(x.shape[0], 2)
        return self.net(x).squeeze(-1)  # the pair axis is a weight-sharing axis of the layers


def _pairs(batch_size=8):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 2, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (20,), generator=g)  # which member is preferred
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)  # 8, 8, 4


def _reward_laplace(cls, backend, fold_pairs, loader):
    torch.manual_seed(0)
    model = PairScorer(fold_pairs).to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = cls(model, "reward_modeling", backend=backend, prior_precision=0.5)
        la.fit(loader)
    return la


@pytest.mark.parametrize("fold_pairs", [False, True], ids=["pair-axis", "pairs-folded"])
@pytest.mark.parametrize("cls", [DiagLaplace, FullLaplace], ids=["diag", "full"])
def test_reward_modeling_equals_curvlinops(cls, fold_pairs):
    loader = _pairs()
    ours = _reward_laplace(cls, CurvkitGGN, fold_pairs, loader)
    ref = _reward_laplace(cls, CurvlinopsGGN, fold_pairs, loader)
    assert ours.H.shape == ref.H.shape == ((ours.n_params,) if cls is DiagLaplace else (ours.n_params,) * 2)
    # curvlinops' full multiplies by a float32 identity (see test_backend.py), so it agrees to
    # ~1e-6 there; its float64 diag is the tight reference for our full's diagonal
    rtol = 1e-10 if cls is DiagLaplace else 1e-5
    torch.testing.assert_close(ours.H, ref.H, rtol=rtol, atol=1e-8)
    if cls is FullLaplace:
        diag = _reward_laplace(DiagLaplace, CurvlinopsGGN, fold_pairs, loader).H
        torch.testing.assert_close(torch.diagonal(ours.H), diag, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.as_tensor(ours.loss), torch.as_tensor(ref.loss), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=rtol, atol=0)
    X = loader.dataset.tensors[0][:5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, want = ours(X, pred_type="glm", link_approx="probit"), ref(X, pred_type="glm", link_approx="probit")
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-10)


def test_reward_modeling_kron_with_folded_pairs_equals_curvlinops_on_the_pair_axis():
    """Folding the pairs into the batch does not change the function. Our K-FAC stays that of
    the pair-axis model (K-FAC-expand over the pair members, equal to curvlinops' there);
    curvlinops on the folded model averages A over B instead of 2B rows (twice as large)."""
    loader = _pairs()
    ours = _reward_laplace(KronLaplace, CurvkitGGN, True, loader)
    ref = _reward_laplace(KronLaplace, CurvlinopsGGN, False, loader)
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-10, atol=0)
    torch.testing.assert_close(ours.posterior_precision.to_matrix(), ref.posterior_precision.to_matrix())


# --- torch.save -----------------------------------------------------------------------


def _classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(30, 3, generator=g, dtype=DT), torch.randint(0, 3, (30,), generator=g)
    return model, DataLoader(TensorDataset(X, y), batch_size=8)


def _fit(model, loader, backend, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(copy.deepcopy(model), "classification", backend=backend, prior_precision=0.5, **kwargs)
        la.fit(loader)
    return la


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # a Laplace object is not a weights-only checkpoint


def _predict(la, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return la(X, pred_type="glm", link_approx="probit")


# BackPACK computes full in float64 (the curvlinops backend's full is float32-accurate); a loaded
# BackPACK diag Laplace cannot predict (its per-sample gradient extension is gone), so curvlinops
# is the diag reference. Last-layer Laplace objects do not pickle with any backend in
# laplace-torch 0.3 (its FeatureExtractor holds local hook functions).
CASES = [
    ("subnetwork", "full", CurvkitGGN, BackPackGGN),
    ("subnetwork", "diag", CurvkitGGN, CurvlinopsGGN),
    ("all", "kron", CurvkitGGN, CurvlinopsGGN),
    ("all", "diag", CurvkitEF, CurvlinopsEF),
]


@pytest.mark.parametrize("subset,structure,ours_cls,ref_cls", CASES)
def test_torch_save_roundtrip_like_laplace_torch_backends(subset, structure, ours_cls, ref_cls):
    model, loader = _classifier()
    kwargs = dict(subset_of_weights=subset, hessian_structure=structure)
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = LargestMagnitudeSubnetMask(model, n_params_subnet=12).select()
    ours, ref = _fit(model, loader, ours_cls, **kwargs), _fit(model, loader, ref_cls, **kwargs)
    ours_loaded, ref_loaded = _roundtrip(ours), _roundtrip(ref)
    X = loader.dataset.tensors[0][:6]
    for la, loaded in ((ours, ours_loaded), (ref, ref_loaded)):
        torch.testing.assert_close(loaded.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=0, atol=0)
        torch.testing.assert_close(_predict(loaded, X), _predict(la, X), rtol=0, atol=0)
    rtol = 1e-10
    torch.testing.assert_close(
        ours_loaded.log_marginal_likelihood(), ref_loaded.log_marginal_likelihood(), rtol=rtol, atol=0
    )
    torch.testing.assert_close(_predict(ours_loaded, X), _predict(ref_loaded, X), rtol=rtol, atol=1e-12)
    # the loaded backend works: refitting gives the same posterior
    before = ours_loaded.log_marginal_likelihood()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_loaded.fit(loader)
    torch.testing.assert_close(ours_loaded.log_marginal_likelihood(), before, rtol=1e-12, atol=0)


def test_custom_registry_that_does_not_pickle_is_named():
    import curvkit

    model, loader = _classifier()
    la = _fit(
        model,
        loader,
        CurvkitGGN,
        subset_of_weights="all",
        hessian_structure="kron",
        backend_kwargs={"registry": curvkit.build_registry()},
    )
    with pytest.raises(TypeError, match=r"cannot pickle this CurvkitGGN: .*registry=None"):
        torch.save(la, io.BytesIO())
