"""Checklist 1 (shapes), 3 (patch tiling), 5 (stage 2 freezing), 7 (latent normalisation) + tiled decoding."""

import pytest
import torch

from meddiffusion3d.autoencoder import PatchVolumeAE, merge_patches, split_patches
from meddiffusion3d.encode import LatentNorm, decode_latent, patch_encode


def _small(ds=4, **kw):
    torch.manual_seed(0)
    return PatchVolumeAE(n_hiddens=8, downsample=ds, num_groups=4, embedding_dim=4, n_codes=64, **kw)


@pytest.mark.parametrize("ds,lat", [(8, 8), (4, 16)])
def test_shapes_64_patch_and_decoder_inverts(ds, lat):
    ae = _small(ds).eval()
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        z = ae.encode(x, quantize=False)
        assert z.shape == (1, 4, lat, lat, lat)
        assert ae.decode_continuous(z).shape == x.shape
        idx = ae.encode(x)
        assert idx.shape == (1, lat, lat, lat) and idx.dtype == torch.int64
        assert ae.decode(idx).shape == x.shape


def test_split_merge_roundtrip_and_bad_shape():
    x = torch.randn(2, 3, 32, 16, 48)
    p, g = split_patches(x, 16)
    assert p.shape == (2 * 2 * 1 * 3, 3, 16, 16, 16) and g == (2, 1, 3)
    assert torch.equal(merge_patches(p, 2, g), x)
    assert torch.equal(p[1], x[0, :, :16, :, 16:32])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        split_patches(torch.randn(1, 1, 24, 16, 16), 16)


def test_patch_encode_equals_retiled_per_patch_and_chunks():
    ae = _small().eval()
    x = torch.randn(2, 1, 32, 16, 16)
    with torch.no_grad():
        ref = torch.zeros(2, 4, 8, 4, 4)
        for b in range(2):
            for i in range(2):
                for j in range(1):
                    blk = x[b : b + 1, :, i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16, :]
                    ref[b : b + 1, :, i * 4 : (i + 1) * 4, j * 4 : (j + 1) * 4, :] = ae.encode(
                        blk, quantize=False
                    )
        for chunk in (1, 3, None):
            torch.testing.assert_close(patch_encode(ae, x, 16, chunk=chunk), ref, atol=1e-5, rtol=0)
        # the spec's "equal in the interior" claim is false: whole-volume encoding differs (GN stats, attention)
        whole = ae.encode(x, quantize=False)
        assert (whole - ref).abs().max() > 1e-3


def test_chunked_encoding_bounds_the_encoder_batch():
    ae = _small().eval()
    seen = []
    ae.encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        patch_encode(ae, torch.randn(1, 1, 48, 48, 32), 16, chunk=5)  # 18 patches
    assert max(seen) <= 5 and sum(seen) == 18


def test_latent_normalisation_identity_and_quantized_decode_uses_codes():
    ae = _small().eval()
    with torch.no_grad():
        ae.codebook.embeddings.copy_(torch.randn(64, 4) * 3)
    norm = LatentNorm.from_codebook(ae)
    z = torch.randn(1, 4, 4, 4, 4) * 5
    torch.testing.assert_close(norm.denorm(norm.norm(z)), z, atol=1e-5, rtol=1e-6)
    e = ae.codebook.embeddings
    assert norm.norm(e).min().item() == pytest.approx(-1) and norm.norm(e).max().item() == pytest.approx(1)
    # decode(quantize=True) feeds only codebook vectors to post_vq_conv
    captured = []
    ae.post_vq_conv.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with torch.no_grad():
        ae.decode(z, quantize=True)
    vecs = captured[0].movedim(1, -1).reshape(-1, 4)
    assert (vecs[:, None, :] == e[None]).all(-1).any(1).all()
    rep = LatentNorm.range_report(norm.norm(z))
    assert rep["frac_outside"] > 0  # un-quantised latents leave [-1, 1] (spec §6.6)


@pytest.mark.parametrize("shape,tile,overlap", [((1, 4, 8, 8, 4), 4, 0.5), ((2, 4, 10, 7, 9), 4, 0.25)])
def test_blended_tiles_equal_untiled_for_a_local_decoder(shape, tile, overlap):
    """With a decoder that sees one latent voxel per output block (1×1×1 conv, ×4 nearest upsampling),
    every tile decodes its voxels exactly as the whole grid does, so the Gaussian-blended sliding window must
    give the untiled output: placement, zoom and weight normalisation are checked, edges shorter than the tile
    included (MONAI sliding_window_inference under the hood)."""
    from meddiffusion3d.encode import _blended_decode

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(shape[1], 1, 1)

    def dec(t):
        return torch.nn.functional.interpolate(conv(t), scale_factor=4, mode="nearest")

    z = torch.randn(shape)
    with torch.no_grad():
        whole = dec(z)
        blended = _blended_decode(dec, z, tile, overlap, 4, sw_batch=3)
    assert blended.shape == whole.shape
    torch.testing.assert_close(blended, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="overlap"):
        _blended_decode(dec, z, tile, 1.0, 4)


def test_tiled_decoding_matches_whole_for_single_tile_and_overlap_shape():
    ae = _small().eval()
    z = torch.randn(1, 4, 8, 8, 4)
    with torch.no_grad():
        whole = decode_latent(ae, z, quantize=False)
        assert torch.equal(decode_latent(ae, z, quantize=False, tile=8), whole)  # one tile = whole
        tiles = decode_latent(ae, z, quantize=False, tile=4)
        assert tiles.shape == whole.shape == (1, 1, 32, 32, 16)
        # each non-overlapping tile is decoded alone
        torch.testing.assert_close(tiles[..., 16:, :16, :], ae.decode_continuous(z[..., 4:, :4, :]))
        blended = decode_latent(ae, z, quantize=False, tile=4, overlap=0.5)
        assert blended.shape == whole.shape and torch.isfinite(blended).all()
        # the first tile's corner is only covered by that tile
        torch.testing.assert_close(
            blended[..., :4, :4, :4], ae.decode_continuous(z[..., :4, :4, :4])[..., :4, :4, :4]
        )


def _stage2_setup(freeze_fix=True):
    ae = _small(stage2_freeze=freeze_fix)
    ae.train()
    with torch.no_grad():  # a "trained" stage-1 codebook
        ae.codebook(ae.pre_vq_conv(ae.encoder(torch.randn(4, 1, 16, 16, 16))))
    ae.set_stage(2)
    return ae


def test_stage2_freezes_encoder_prevq_codebook():
    from meddiffusion3d.config import AEConfig
    from meddiffusion3d.losses import AELoss

    ae = _stage2_setup()
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    opt = torch.optim.Adam(ae.trainable_parameters(), lr=1e-3)
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in list(ae.decoder.parameters()) + list(ae.post_vq_conv.parameters())}
    cfg = AEConfig(perceptual="random_tiny_2d")
    loss_fn = AELoss(cfg)
    for k in range(3):
        ae.train()  # logger-style toggles: official VolumeLogger calls train() after eval()
        ae.eval()
        ae.train()
        x = torch.randn(1, 1, 32, 32, 16)
        x_recon, vq = ae(x, patch=16)
        loss, _ = loss_fn.generator(x, x_recon, vq, None, k, 100, stage=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ae.state_dict()
    for name, t in before.items():
        same = torch.equal(t, after[name])
        if name.startswith(("encoder.", "pre_vq_conv.", "codebook.")):
            assert same, name
        elif name.endswith("weight") and name.startswith(("decoder.", "post_vq_conv.")):
            assert not same, name
    for p in list(ae.encoder.parameters()) + list(ae.pre_vq_conv.parameters()):
        assert p.grad is None and not p.requires_grad
    assert not ae.codebook.training and not ae.encoder.training and ae.decoder.training
    with pytest.raises(ValueError, match="multiple of the patch size 64"):
        ae(torch.randn(1, 1, 96, 96, 96), patch=64)


def test_stage2_without_fix_reproduces_official_drift():
    ae = _stage2_setup(freeze_fix=False)
    emb = ae.codebook.embeddings.clone()
    ae.train()  # the official logger callback re-enables training mode
    with torch.no_grad():
        ae(torch.randn(1, 1, 32, 32, 16), patch=16)
    assert not torch.equal(emb, ae.codebook.embeddings)  # EMA/restarts move the "frozen" codebook


def test_no_import_cycle_between_autoencoder_and_encode():
    """encode.py names PatchVolumeAE for annotations only; autoencoder.py imports encode.py (one direction)."""
    import ast
    import importlib.util

    def runtime_imports(mod: str) -> set:
        tree = ast.parse(open(importlib.util.find_spec(f"meddiffusion3d.{mod}").origin).read())
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for n in ast.walk(node)
        }
        return {
            n.module
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.level == 1 and id(n) not in skip
        }

    assert "autoencoder" not in runtime_imports("encode")
    assert "encode" in runtime_imports("autoencoder")
