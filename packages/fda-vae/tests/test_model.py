"""Spec §7 items 1-4: shapes, parameter counts, flip, determinism."""

from __future__ import annotations

import pytest
import torch

from fda_vae.model import FDAVAE, build_discriminators, build_generator


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny() -> FDAVAE:
    torch.manual_seed(0)
    return FDAVAE(channels=(8, 16), num_res_blocks=1, latent_channels=4, norm_num_groups=4).eval()


def test_parameter_counts_paper(paper_cfg):
    g = build_generator(paper_cfg.model)
    assert count(g) == 18_885_266
    assert count(g.encoder) == 5_557_072
    assert count(g.decoder_a) == count(g.decoder_b) == 6_663_553
    d = build_discriminators(paper_cfg.model, paper_cfg.disc)
    assert count(d["a"]) == count(d["b"]) == 692_769
    # no dead proj_attn (spec §6.1), SDPA attention (spec §6.2)
    assert not any("proj_attn" in k or "out_proj" in k for k in g.state_dict())
    assert all(m.attn.use_flash_attention for m in (g.get_submodule(p) for p in g.attention_prefixes()))
    ups = [g.get_submodule(p) for p in g.upsampler_prefixes()]
    assert len(ups) == 4 and all(u.kernel_size == (3, 3) and u.output_padding == (1, 1) for u in ups)


def test_tiny_counts(tiny_cfg):
    assert count(build_generator(tiny_cfg.model)) == 57_086 - 3 * 272  # official tiny minus 3 proj_attn
    assert count(build_discriminators(tiny_cfg.model, tiny_cfg.disc)["a"]) == 10_889


@pytest.mark.slow
def test_shapes_paper(paper_cfg):
    torch.manual_seed(0)
    g = build_generator(paper_cfg.model).eval()
    x = torch.rand(2, 1, 256, 256) * 2 - 1
    with torch.no_grad():
        out = g(x, "a")
    assert out.mu.shape == out.sigma.shape == (2, 16, 64, 64)
    assert out.own.shape == out.cross.shape == (2, 1, 256, 256)
    for t in (out.own, out.cross):
        assert t.abs().max() < 1.0


def test_shapes_tiny():
    g = tiny()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        out = g(x, "b")
        mu, sigma = g.encode(x)
    assert mu.shape == sigma.shape == out.mu.shape == (2, 4, 8, 8)
    assert out.own.shape == (2, 1, 16, 16) and out.image("a") is out.cross and out.image("b") is out.own
    assert (sigma > 0).all() and out.cross.abs().max() < 1


def test_flip_involution_and_deterministic_reconstruction():
    g = tiny()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        mu, sigma = g.encode(x)
        f_mu, f_sigma = g.flip(mu, sigma)
        assert f_sigma is sigma and torch.equal(f_mu, -mu)
        mu2, sigma2 = g.flip(*g.flip(mu, sigma))
        assert torch.equal(mu2, mu) and torch.equal(sigma2, sigma)
        own = g(x, "a", sample=False).own
        assert torch.equal(g.decode(mu2, "a"), own)
        # translate decodes -mu with the other decoder
        assert torch.equal(g.translate(x, "a"), g(x, "a", sample=False).cross)


def test_translate_determinism():
    g = tiny()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(g.translate(x, "a"), g.translate(x, "a"))
    s1 = g.translate(x, "a", sample=True, generator=torch.Generator().manual_seed(1))
    s1b = g.translate(x, "a", sample=True, generator=torch.Generator().manual_seed(1))
    s2 = g.translate(x, "a", sample=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(s1, s1b)
    assert (s1 - s2).abs().max() > 1e-4
    assert (s1 - g.translate(x, "a")).abs().max() > 1e-4


def test_bad_phase():
    with pytest.raises(ValueError, match="phase"):
        tiny().translate(torch.zeros(1, 1, 16, 16), "c")


def test_sdpa_and_plain_attention_agree():
    """model.use_flash_attention: torch SDPA (default, replaces xformers) == MONAI's plain attention."""
    g = tiny()
    plain = FDAVAE(
        channels=(8, 16), num_res_blocks=1, latent_channels=4, norm_num_groups=4, use_flash_attention=False
    ).eval()
    plain.load_state_dict(g.state_dict())
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(g.translate(x, "a"), plain.translate(x, "a"), rtol=1e-4, atol=1e-4)  # reference README tolerance
