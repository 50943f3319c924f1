"""Official fixtures: constructor mapping, keys/shapes, layer tables (spec §8.2), counts (§8.3), outputs."""

from __future__ import annotations

import pytest
import torch

from uni_coal.convert import (
    convert_official,
    convert_state_dict,
    discriminator_config_from_official,
    generator_config_from_official,
)
from uni_coal.discriminator import CoModDiscriminator
from uni_coal.model import UniCOALGenerator, layer_table

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def paper_g(paper_keys):
    cfg = generator_config_from_official(paper_keys["generator"]["full_config_node"])
    with torch.device("meta"):
        return UniCOALGenerator(cfg)


def test_paper_generator_keys_shapes_and_count(paper_keys, paper_g):
    ref = paper_keys["generator"]
    sd = paper_g.state_dict()
    assert set(sd) == set(ref["state_dict"])
    assert all(list(sd[k].shape) == v for k, v in ref["state_dict"].items())
    assert sum(p.numel() for p in paper_g.parameters()) == ref["num_params"] == 59_253_681
    bd = ref["num_params_breakdown"]
    enc = paper_g.synthesis.encoder
    assert sum(p.numel() for p in paper_g.mapping.parameters()) == bd["mapping"]
    assert sum(p.numel() for p in enc.parameters()) == bd["synthesis.encoder"]
    assert sum(p.numel() for p in enc.fc_in.parameters()) == bd["synthesis.encoder.fc_in"]
    assert sum(p.numel() for p in enc.e_16x16.parameters()) == bd["synthesis.encoder.e_16x16"]


def test_paper_layer_tables_match_exactly(paper_keys, paper_g):
    syn, enc = layer_table(paper_g)
    ref_syn = paper_keys["generator"]["synthesis_layer_table"]
    ref_enc = paper_keys["generator"]["encoder_layer_table"]
    assert len(syn) == len(ref_syn) == 15 and len(enc) == len(ref_enc) == 14
    for ours, ref in zip(syn, ref_syn):
        for k, v in ref.items():
            if isinstance(v, float):
                assert ours[k] == pytest.approx(v, rel=1e-12, abs=1e-12), (ref["name"], k)
            else:
                assert ours[k] == v, (ref["name"], k)
    for ours, ref in zip(enc, ref_enc):
        for k, v in ref.items():
            assert ours[k] == v, (ref["name"], k)


def test_paper_discriminator_keys_and_count(paper_keys):
    ref = paper_keys["discriminator"]
    with torch.device("meta"):
        d = CoModDiscriminator(discriminator_config_from_official(ref["full_config_node"]))
    sd = d.state_dict()
    assert set(sd) == set(ref["state_dict"])
    assert all(list(sd[k].shape) == v for k, v in ref["state_dict"].items())
    assert sum(p.numel() for p in d.parameters()) == ref["num_params"] == 24_592_448


def test_paper_shapes_meta_forward(paper_g):
    """Spec §8.3 shapes at R=256 (meta device: shapes only)."""
    with torch.device("meta"):
        x = torch.empty(2, 4, 256, 256)
        z, c, d = torch.empty(2, 64), torch.empty(2, 3), torch.empty(2, 1)
        out = paper_g.eval()(z, c, d, x)
        feats, final, g = paper_g.synthesis.encoder(x, c, d)
    assert tuple(out.shape) == (2, 1, 256, 256)
    assert {k: v.shape[1] for k, v in feats.items()} == {276: 64, 148: 181, 84: 512, 52: 512, 36: 512}
    assert all(v.shape[-1] == k for k, v in feats.items())
    assert tuple(final.shape) == (2, 512, 36, 36) and tuple(g.shape) == (2, 1024)


def _tiny_generator(fx):
    g = UniCOALGenerator(generator_config_from_official(fx["generator"]["constructor"])).eval()
    sd, unmapped, missing = convert_state_dict(fx["generator"]["state_dict"], g)
    assert unmapped == [] and missing == []
    g.load_state_dict(sd)
    return g


def test_tiny_generator_reproduces_official(tiny_fixture):
    fx = tiny_fixture["generator"]
    g = _tiny_generator(tiny_fixture)
    assert sum(p.numel() for p in g.parameters()) == fx["num_params"]
    i, o = fx["inputs"], fx["outputs"]
    with torch.no_grad():
        img = g(i["z"], i["c"], i["index"], i["cond_img"])
        ws = g.mapping(i["z"], i["c"], i["index"])
        feats, final, gc = g.synthesis.encoder(i["cond_img"], i["c"], i["index"])
    torch.testing.assert_close(img, o["img"], **TOL)
    torch.testing.assert_close(ws, o["ws"], **TOL)
    torch.testing.assert_close(final, o["encoder_final"], **TOL)
    torch.testing.assert_close(gc, o["global_code"], **TOL)
    assert sorted(feats) == sorted(int(k) for k in o["encoder_features"])
    for k, v in o["encoder_features"].items():
        torch.testing.assert_close(feats[int(k)], v, **TOL)
    assert (img - o["img"]).abs().max().item() < 2e-5  # measured ~1.5e-6


def test_tiny_discriminator_reproduces_official(tiny_fixture):
    fx = tiny_fixture["discriminator"]
    d = CoModDiscriminator(discriminator_config_from_official(fx["constructor"])).eval()
    sd, unmapped, missing = convert_state_dict(fx["state_dict"], d)
    assert unmapped == [] and missing == []
    d.load_state_dict(sd)
    assert sum(p.numel() for p in d.parameters()) == fx["num_params"]
    i, o = fx["inputs"], fx["outputs"]
    with torch.no_grad():
        torch.testing.assert_close(d(i["img_fake"], i["c"], i["index"]), o["logits_fake"], **TOL)
        torch.testing.assert_close(d(i["img_real"], i["c"], i["index"]), o["logits_real"], **TOL)


def test_convert_official_cli_roundtrip(tiny_fixture, tmp_path):
    from uni_coal.cli import main
    from uni_coal.infer import load_generator

    src = tmp_path / "official.pt"
    fx = tiny_fixture
    torch.save(
        {
            "generator": {
                "constructor": fx["generator"]["constructor"],
                "state_dict": fx["generator"]["state_dict"],
            },
            "discriminator": {
                "constructor": fx["discriminator"]["constructor"],
                "state_dict": fx["discriminator"]["state_dict"],
            },
        },
        src,
    )
    dst = tmp_path / "ours.pt"
    assert main(["convert-official", str(src), str(dst)]) == 0
    g, cfg = load_generator(dst)
    i = fx["generator"]["inputs"]
    with torch.no_grad():
        torch.testing.assert_close(
            g(i["z"], i["c"], i["index"], i["cond_img"]), fx["generator"]["outputs"]["img"], **TOL
        )
    # a bare official state dict with a DataParallel prefix also converts (needs our config for the shapes)
    bare = tmp_path / "latest_net_G.pth"
    torch.save({"module." + k: v for k, v in fx["generator"]["state_dict"].items()}, bare)
    from medsynth_core.config import save_config

    save_config(cfg, tmp_path / "cfg.yaml")  # the config saved with the first conversion
    report = convert_official(bare, tmp_path / "ours2.pt", tmp_path / "cfg.yaml")
    assert report["G_ema_unmapped"] == []
    bare_d = tmp_path / "latest_net_D.pth"
    torch.save(fx["discriminator"]["state_dict"], bare_d)
    report = convert_official(bare_d, tmp_path / "ours3.pt", tmp_path / "cfg.yaml")
    assert report["D_unmapped"] == [] and report["D_params"] == fx["discriminator"]["num_params"]


def test_convert_rejects_foreign(tmp_path):
    from medsynth_core.cli import UserError

    p = tmp_path / "x.pt"
    torch.save({"foo": torch.zeros(1)}, p)
    with pytest.raises(UserError, match="no generator"):
        convert_official(p, tmp_path / "y.pt")


OFFICIAL_CHAIN = {  # zhiyuns/UniCOAL configs/ixi/multitask/allrand/UniCOAL (keys as in the repository)
    "allrand.yml": """_BASE_: "../../base.yml"
model:
  name: unicoal
  G: {netG: unicoal, img_channels_in: 4, c_dim: 3, index_dim: 1}
  D: {netD: comodgan, img_channels: 5, c_dim: 3, index_dim: 1, epilogue_kwargs: {mbstd_group_size: 16}}
loaders: {batch_size: 16, thickness: [4, 2, 1], slice_num: 4, raw_internal_path_in: [T1, T2, PD],
          raw_internal_path_out: [T1, PD, T2], all_hr: true}
optimizer: {lr_G: 0.00125, lr_D: 0.001}
scheduler: {ema: {enabled: true, ema_kimgs: 10}}
loss: {blur_init_sigma: 10, blur_fade_kimg: 100}
""",
    "1_short_latent.yml": '_BASE_: "./allrand.yml"\nmodel: {G: {z_dim: 64}, D: {mapping_kwargs: {embed_features: 64}}}\n',
    "2_short_mapping.yml": '_BASE_: "./1_short_latent.yml"\n'
    "model: {G: {mapping_kwargs: {num_layers: 2}}, D: {mapping_kwargs: {num_layers: 2}}}\n",
    "3_modulated_encoder.yml": '_BASE_: "./2_short_mapping.yml"\nmodel: {G: {synthesis_kwargs: {encoder_kwargs: '
    "{modulated: true, mapping_kwargs: {c_dim: 3, index_dim: 1, embed_features: 64, w_dim: 512, num_layers: 2}}}}}\n",
    "4_more_thickness.yml": '_BASE_: "./3_modulated_encoder.yml"\nloaders: {thickness: [4, 6, 2, 1]}\n',
    "5_high_lr.yml": '_BASE_: "./4_more_thickness.yml"\noptimizer: {lr_G: 0.0025, lr_D: 0.002}\n',
    "6_final.yml": '_BASE_: "./5_high_lr.yml"\nloss: {lambda_sam: 100.0, lambda_L1: 80.0, blur_fade_kimg: 200}\n'
    "name: ixi_unicoal_final\n",
}


def test_official_yaml_chain_maps_to_paper_config(paper_keys, tmp_path):
    from uni_coal.convert import config_from_official_yaml

    d = tmp_path / "configs" / "ixi" / "multitask" / "allrand" / "UniCOAL"
    d.mkdir(parents=True)
    (tmp_path / "configs" / "ixi" / "multitask" / "base.yml").write_text("loss: {lambda_r1: 10}\n")
    for name, text in OFFICIAL_CHAIN.items():
        (d / name).write_text(text)
    cfg = config_from_official_yaml(d / "6_final.yml")
    assert cfg.generator == generator_config_from_official(paper_keys["generator"]["full_config_node"])
    assert cfg.discriminator == discriminator_config_from_official(
        paper_keys["discriminator"]["full_config_node"]
    )
    assert (cfg.loss.lambda_sam, cfg.loss.lambda_l1, cfg.loss.blur_fade_images) == (100.0, 80.0, 200_000)
    assert (cfg.optim.lr_g, cfg.optim.lr_d, cfg.optim.ema_half_life_images) == (0.0025, 0.002, 10_000.0)
    assert cfg.data.thicknesses == (4, 6, 2, 1) and cfg.data.modalities == ("T1", "PD", "T2")
    with torch.device("meta"):
        assert sum(p.numel() for p in UniCOALGenerator(cfg.generator).parameters()) == 59_253_681
