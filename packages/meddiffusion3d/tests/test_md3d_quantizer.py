"""Checklist 4: straight-through, commitment, 0 parameters, hand-computed EMA step, dead-code restart,
bit-identical eval, reload without re-initialisation (and the official re-init with the fix off)."""

import copy

import torch
import torch.nn.functional as F

from meddiffusion3d.quantizer import Codebook


def test_straight_through_commitment_no_params():
    cb = Codebook(16, 3).eval()
    assert sum(p.numel() for p in cb.parameters()) == 0 and len(list(cb.parameters())) == 0
    z = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    out = cb(z)
    out["embeddings"].sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    e = cb.lookup(out["encodings"])
    torch.testing.assert_close(out["commitment_loss"], 0.25 * F.mse_loss(z.detach(), e))
    torch.testing.assert_close(out["embeddings"].detach(), e)


def test_hand_computed_ema_step_and_restart():
    torch.manual_seed(0)
    cb = Codebook(4, 2, restart_thres=1.0)
    cb.train()
    with torch.no_grad():
        cb.embeddings.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0], [100.0, 100.0]]))
        cb.z_avg.copy_(cb.embeddings)
        cb.N.copy_(torch.tensor([1.0, 1.0, 200.0, 1.0]))
        cb.initialized.fill_(True)
    # 3 vectors near code 0, 1 near code 1, none near codes 2 or 3
    flat = torch.tensor([[0.1, 0.0], [0.0, 0.2], [-0.1, 0.1], [9.0, 10.0]])
    z = flat.t().reshape(1, 2, 4, 1, 1)
    N0, zavg0 = cb.N.clone(), cb.z_avg.clone()
    cb(z)
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])
    sums = torch.stack([flat[:3].sum(0), flat[3], torch.zeros(2), torch.zeros(2)])
    N = 0.99 * N0 + 0.01 * counts
    zavg = 0.99 * zavg0 + 0.01 * sums
    n = N.sum()
    e = zavg / ((N + 1e-7) / (n + 4 * 1e-7) * n).unsqueeze(1)
    torch.testing.assert_close(cb.N, N)
    torch.testing.assert_close(cb.z_avg, zavg)
    # codes 0, 1 (N = 1.02, 1.0) and 2 (N = 198) are kept; code 3 (N = 0.99 < 1) is restarted
    torch.testing.assert_close(cb.embeddings[:3], e[:3])
    assert not torch.allclose(cb.embeddings[3], e[3])
    # the restarted code is a jittered copy of one of the batch vectors (std 0.01/sqrt(2))
    assert torch.cdist(cb.embeddings[3:4], flat).min() < 0.05


def test_eval_forward_leaves_buffers_bit_identical():
    cb = Codebook(32, 4)
    cb.train()
    cb(torch.randn(2, 4, 4, 4, 4))
    cb.eval()
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    for _ in range(3):
        cb(torch.randn(2, 4, 4, 4, 4))
    for k, v in cb.state_dict().items():
        assert torch.equal(before[k], v), k


def _trained(flag):
    torch.manual_seed(1)
    cb = Codebook(32, 4, init_flag_buffer=flag)
    cb.train()
    for _ in range(3):
        cb(torch.randn(2, 4, 4, 4, 4) + 5)
    return cb


def _continue(cb, z):
    cb.train()
    torch.manual_seed(2)
    cb(z)
    return cb.embeddings.clone()


def test_state_dict_roundtrip_then_train_forward_does_not_reinit():
    cb = _trained(True)
    fresh = Codebook(32, 4)
    fresh.load_state_dict(cb.state_dict())
    assert not fresh.needs_init
    z = torch.randn(1, 4, 2, 2, 2) - 20
    # a reloaded codebook continues exactly like the one that never left memory
    assert torch.equal(_continue(fresh, z), _continue(copy.deepcopy(cb), z))
    assert fresh.embeddings.mean() > -10  # no re-init from this far-away batch


def test_official_flag_reinitialises_after_reload():
    cb = _trained(False)
    assert "initialized" not in cb.state_dict()
    fresh = Codebook(32, 4, init_flag_buffer=False)
    fresh.load_state_dict(cb.state_dict())
    assert fresh.needs_init  # the official attribute is lost on reload
    fresh.train()
    z = torch.randn(1, 4, 2, 2, 2) - 20  # far from every trained code
    fresh(z)
    assert fresh.embeddings.mean() < -10  # the codebook was re-initialised from this batch
