"""convert-official: paper key map, tiny fixture outputs, constructor mapping, CLI round trip."""

from __future__ import annotations

import json

import pytest
import torch

from fda_vae.cli import main
from fda_vae.convert import (
    convert_discriminator_state,
    convert_generator_state,
    disc_config_from_official,
    map_generator_keys,
    model_config_from_official,
)
from fda_vae.infer import load_generator
from fda_vae.model import build_discriminator, build_generator

TOL = dict(rtol=1e-4, atol=1e-4)


def test_paper_keys_all_map(ref_dir):
    spec = json.loads((ref_dir / "official_keys_paper.json").read_text())
    gen = spec["generator"]
    model = build_generator(model_config_from_official(gen["constructor"]))
    mapping, dropped = map_generator_keys(
        list(gen["state_dict"]), model.attention_prefixes(), model.upsampler_prefixes()
    )
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(mapping.values()) == set(own) and len(mapping) == len(own)
    for k, v in mapping.items():
        assert gen["state_dict"][k] == own[v], k
    assert all(".proj_attn." in k for k in dropped)
    n_dead = sum(torch.Size(gen["state_dict"][k]).numel() for k in dropped)
    assert n_dead == gen["num_params_breakdown"]["proj_attn_unused_total"] == 197_376
    assert sum(p.numel() for p in model.parameters()) == gen["num_params"] - n_dead == 18_885_266
    disc = spec["discriminator"]
    d = build_discriminator(**{k: v for k, v in vars(disc_config_from_official(disc["constructor"])).items()})
    assert {k: list(v.shape) for k, v in d.state_dict().items()} == disc["state_dict"]
    assert sum(p.numel() for p in d.parameters()) == disc["num_params"]


def _tiny_generator(ref_dir):
    fx = torch.load(ref_dir / "official_tiny.pt")["generator"]
    model = build_generator(model_config_from_official(fx["constructor"])).eval()
    state, dropped = convert_generator_state(fx["state_dict"], model)
    model.load_state_dict(state, strict=True)
    assert len(dropped) == 6
    return model, fx


def test_tiny_generator_outputs(ref_dir):
    model, fx = _tiny_generator(ref_dir)
    assert sum(p.numel() for p in model.parameters()) == fx["num_params"] - 3 * 272
    x, o = fx["inputs"]["x"], fx["outputs"]
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), o["encoder_out"], **TOL)
        mu, sigma = model.encode(x)
        torch.testing.assert_close(mu, o["z_mu"], **TOL)
        torch.testing.assert_close(sigma, o["z_sigma"], **TOL)
        torch.testing.assert_close(model.decode(mu, "b"), o["decode_ct_of_mu"], **TOL)
        torch.testing.assert_close(model.decode(mu, "a"), o["decode_mr_of_mu"], **TOL)
        for label, src in (("ct", "b"), ("mr", "a")):
            out = model(x, src, sample=False)
            ref = o[f"val_reconstruct_{label}"]
            torch.testing.assert_close(out.image("b"), ref["reconstruction_ct"], **TOL)
            torch.testing.assert_close(out.image("a"), ref["reconstruction_mr"], **TOL)


def test_tiny_generator_sampled_forward(ref_dir):
    """Optional check: same noise order as the official forward (own branch first)."""
    model, fx = _tiny_generator(ref_dir)
    x, o = fx["inputs"]["x"], fx["outputs"]
    for label, src in (("ct", "b"), ("mr", "a")):
        torch.manual_seed(fx["inputs"][f"forward_seed_{label}"])
        with torch.no_grad():
            out = model(x, src)
        ref = o[f"forward_{label}_sampled"]
        torch.testing.assert_close(out.image("b"), ref["reconstruction_ct"], **TOL)
        torch.testing.assert_close(out.image("a"), ref["reconstruction_mr"], **TOL)
        torch.testing.assert_close(out.mu, ref["z_mu"], **TOL)
        torch.testing.assert_close(out.sigma, ref["z_sigma"], **TOL)


def test_tiny_discriminator_outputs(ref_dir):
    fx = torch.load(ref_dir / "official_tiny.pt")["discriminator"]
    c = disc_config_from_official(fx["constructor"])
    d = build_discriminator(num_layers_d=c.num_layers_d, channels=c.channels, norm=c.norm).eval()
    d.load_state_dict(convert_discriminator_state(fx["state_dict"]), strict=True)
    with torch.no_grad():
        out = d(fx["inputs"]["x"])
    feats = fx["outputs"]["features"]
    assert len(out) == len(feats) + 1
    for a, b in zip(out[:-1], feats):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(out[-1], fx["outputs"]["logits"], **TOL)


def test_cli_convert_round_trip(ref_dir, tmp_path, capsys):
    fx = torch.load(ref_dir / "official_tiny.pt")
    src = tmp_path / "generator_40.pth"
    torch.save({f"module.{k}": v for k, v in fx["generator"]["state_dict"].items()}, src)  # DDP-saved
    cons = tmp_path / "constructor.json"
    cons.write_text(json.dumps(fx["generator"]["constructor"]))
    dst = tmp_path / "ours.pt"
    assert main(["convert-official", "--json", str(src), str(dst), "--constructor", str(cons)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["network"] == "generator" and len(report["dropped_keys"]) == 6
    model, cfg = load_generator(dst)
    assert cfg.model.channels == [8, 16] and cfg.model.latent_channels == 4
    with torch.no_grad():
        out = model(fx["generator"]["inputs"]["x"], "b", sample=False)
    torch.testing.assert_close(
        out.own, fx["generator"]["outputs"]["val_reconstruct_ct"]["reconstruction_ct"], **TOL
    )
    # without --constructor: everything but the GroupNorm group count is read off the weights; a bare
    # state dict does not hold the group count (4 here), so it is refused instead of guessed (issue 12)
    dst2 = tmp_path / "inferred.pt"
    assert main(["convert-official", "--json", str(src), str(dst2)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--constructor" in err and "norm_num_groups" in err
    assert "--norm-num-groups" in err and "[1, 2, 4, 8]" in err and not dst2.exists()
    assert main(["convert-official", "--json", str(src), str(dst2), "--norm-num-groups", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["norm_num_groups"] == 4 and report["norm_num_groups_from"] == "--norm-num-groups"
    model2, cfg2 = load_generator(dst2)
    inferred = cfg2.model
    assert inferred.channels == [8, 16] and inferred.num_res_blocks == 1 and inferred.latent_channels == 4
    with torch.no_grad():
        out2 = model2(fx["generator"]["inputs"]["x"], "b", sample=False)
    torch.testing.assert_close(
        out2.own, fx["generator"]["outputs"]["val_reconstruct_ct"]["reconstruction_ct"], **TOL
    )
    # the fixture file itself stores the official constructor beside the weights: read from there
    dst3 = tmp_path / "from_file.pt"
    assert main(["convert-official", "--json", str(ref_dir / "official_tiny.pt"), str(dst3)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["norm_num_groups"] == 4
        and report["norm_num_groups_from"] == "checkpoint [generator.constructor]"
    )
    assert load_generator(dst3)[1].model.channels == [8, 16]
    # discriminator
    dsrc = tmp_path / "discriminator_delay_40.pth"
    torch.save(fx["discriminator"]["state_dict"], dsrc)
    assert main(["convert-official", "--json", str(dsrc), str(tmp_path / "d.pt")]) == 0


def test_cli_convert_bad_input(tmp_path, capsys):
    bad = tmp_path / "junk.pth"
    torch.save({"quant_conv_mu.conv.weight": torch.zeros(3, 3, 1, 1), "foo.weight": torch.zeros(2)}, bad)
    assert main(["convert-official", "--json", str(bad), str(tmp_path / "o.pt")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["convert-official", "--json", str(tmp_path / "missing.pth"), str(tmp_path / "o.pt")]) == 2
    # a converted checkpoint of another model family is refused by the loader
    from medsynth_core.checkpoint import CheckpointError, atomic_torch_save, build_checkpoint

    other = tmp_path / "other.pt"
    atomic_torch_save(build_checkpoint(kind="drdm", step=0, models={}), other)
    with pytest.raises(CheckpointError, match="drdm"):
        load_generator(other)


# ------------------------------------------------------- GroupNorm group count without the reference
def _official_state(model) -> dict[str, torch.Tensor]:
    """Our generator's weights under the official key names (the inverse of the convert key map)."""
    att, ups = model.attention_prefixes(), model.upsampler_prefixes()
    out = {}
    for k, v in model.state_dict().items():
        for p in att:
            if k.startswith(p + ".attn."):
                k = p + "." + k[len(p) + len(".attn.") :]
        for p in ups:
            if k.startswith(p + "."):
                k = p + ".conv.conv." + k[len(p) + 1 :]
        for ours, official in (
            ("decoder_a.", "decoder_2."),
            ("decoder_b.", "decoder."),
            ("post_quant_conv_a.", "post_quant_conv_2."),
            ("post_quant_conv_b.", "post_quant_conv."),
        ):
            if k.startswith(ours):
                k = official + k[len(ours) :]
        out[k] = v.clone()
    return out


def _synthetic(channels=(8, 16), groups=4):
    from fda_vae.config import ModelConfig

    torch.manual_seed(0)
    model = build_generator(
        ModelConfig(channels=list(channels), num_res_blocks=1, latent_channels=4, norm_num_groups=groups)
    ).eval()
    with torch.no_grad():  # non-trivial norm affine maps, so the group count changes the outputs
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model, _official_state(model)


def _converted(dst):
    model, cfg = load_generator(dst)
    with torch.no_grad():
        return model(torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16), "a", sample=False).cross, cfg


def test_convert_group_count_never_guessed(tmp_path, capsys):
    ref, official = _synthetic()
    x = torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16)
    with torch.no_grad():
        want = ref(x, "a", sample=False).cross
    bare = tmp_path / "generator_10.pth"
    torch.save(official, bare)
    # a bare official state dict: refused with one line naming the options, nothing written
    assert main(["convert-official", "--json", str(bare), str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--constructor" in err and "norm_num_groups" in err
    assert not (tmp_path / "o.pt").exists()
    # a group count that does not divide the channels is refused too
    assert main(["convert-official", "--json", str(bare), str(tmp_path / "o.pt"), "--norm-num-groups", "3"]) == 2
    assert "[1, 2, 4, 8]" in capsys.readouterr().err
    # the right count reproduces the network; the count the old guess picked (8) does not
    for groups, same in ((4, True), (8, False)):
        dst = tmp_path / f"g{groups}.pt"
        assert main(["convert-official", "--json", str(bare), str(dst), "--norm-num-groups", str(groups)]) == 0
        capsys.readouterr()
        got, cfg = _converted(dst)
        assert cfg.model.norm_num_groups == groups
        assert torch.equal(got, want) is same
        if not same:
            assert float((got - want).abs().max()) > 1e-3
    # a partial --constructor: omitted keys take the official defaults (channels 64/128/256 here),
    # so the shapes do not fit and the conversion says so
    assert (
        main(
            ["convert-official", "--json", str(bare), str(tmp_path / "p.pt"), "--constructor", '{"norm_num_groups": 4}']
        )
        == 2
    )
    assert "does not fit" in capsys.readouterr().err


@pytest.mark.parametrize(
    "wrap, where",
    [
        (lambda sd, c: {"state_dict": sd, "config": {"norm_num_groups": 4}}, "checkpoint [config]"),
        (lambda sd, c: {"state_dict": sd, "hyper_parameters": c}, "checkpoint [hyper_parameters]"),
        (lambda sd, c: {"generator": sd, "constructor": c}, "checkpoint [constructor]"),
    ],
)
def test_convert_group_count_from_stored_config(tmp_path, capsys, wrap, where):
    ref, official = _synthetic()
    constructor = {"num_channels": [8, 16], "num_res_blocks": 1, "latent_channels": 4, "norm_num_groups": 4}
    src = tmp_path / "wrapped.pt"
    torch.save(wrap(official, constructor), src)
    assert main(["convert-official", "--json", str(src), str(tmp_path / "o.pt")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["norm_num_groups"] == 4 and report["norm_num_groups_from"] == where
    got, cfg = _converted(tmp_path / "o.pt")
    with torch.no_grad():
        assert torch.equal(
            got, ref(torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16), "a", sample=False).cross
        )


def test_convert_group_count_one_when_forced(tmp_path, capsys):
    """Channels with gcd 1 admit only one group count: exact, no option needed."""
    ref, official = _synthetic(channels=(5, 7), groups=1)
    src = tmp_path / "g.pth"
    torch.save(official, src)
    assert main(["convert-official", "--json", str(src), str(tmp_path / "o.pt")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["norm_num_groups"] == 1 and report["norm_num_groups_from"].startswith("channels")
    got, cfg = _converted(tmp_path / "o.pt")
    assert cfg.model.channels == [5, 7]
