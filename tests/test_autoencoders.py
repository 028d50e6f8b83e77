"""Autoencoder backends: the lossless pixel one, diffusers folders, offline hub ids."""

from __future__ import annotations

import json
import time

import pytest
import torch

from decodiff_cli.autoencoders import AutoencoderUnavailable, describe, load_autoencoder, rebuild_autoencoder
from decodiff_cli.autoencoders.pixel import PixelAutoencoder
from decodiff_cli.config import AutoencoderConfig, ModelConfig


def _images(n=2, h=64, w=48, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------- pixel


def test_pixel_round_trip_is_exact_and_latent_shape():
    ae = load_autoencoder("pixel")
    assert isinstance(ae, PixelAutoencoder)
    assert ae.kind == "pixel" and ae.latent_channels == 192 and ae.downsample == 8
    x = _images()
    z = ae.encode(x)
    assert z.shape == (2, 192, 8, 6)
    assert torch.equal(ae.decode(z), x)
    assert list(ae.state_dict()) == []  # nothing to store in a bundle


def test_pixel_latent_pixel_is_the_8x8_block_at_its_place():
    ae = PixelAutoencoder()
    x = _images(n=1)
    y = x.clone()
    y[:, :, 24:32, 40:48] += 0.5  # block (3, 5)
    changed = (ae.encode(y) != ae.encode(x)).any(dim=1)[0]
    assert changed.shape == (8, 6)
    assert changed.nonzero().tolist() == [[3, 5]]
    # and the 192 values of that latent pixel are exactly that block's 3*8*8 values
    assert torch.equal(ae.encode(x)[0, :, 3, 5].sort().values, x[0, :, 24:32, 40:48].flatten().sort().values)


def test_pixel_other_downsample_and_describe_rebuild():
    ae = PixelAutoencoder(downsample=4)
    assert ae.latent_channels == 48
    assert ae.encode(_images(h=16, w=8)).shape == (2, 48, 4, 2)
    cfg = describe(load_autoencoder("pixel"), "pixel")
    assert cfg == AutoencoderConfig(spec="pixel", kind="pixel", architecture={"downsample": 8}, latent_channels=192, downsample=8)
    # through JSON, as a bundle stores it
    cfg2 = ModelConfig.from_dict(json.loads(json.dumps(ModelConfig(autoencoder=cfg).to_dict()))).autoencoder
    again = rebuild_autoencoder(cfg2)
    assert isinstance(again, PixelAutoencoder) and again.downsample == 8
    x = _images()
    assert torch.equal(again.decode(again.encode(x)), x)
    rebuilt4 = rebuild_autoencoder(describe(ae, "pixel"))
    assert rebuilt4.downsample == 4 and rebuilt4.latent_channels == 48


def test_rebuild_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="vqgan"):
        rebuild_autoencoder(AutoencoderConfig(spec="x", kind="vqgan"))


# ------------------------------------------------------------------------ unavailable


def _unreachable_hub(monkeypatch, tmp_path):
    """A hub endpoint on a closed local port, and an empty cache."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


@pytest.mark.filterwarnings("ignore::UserWarning")  # huggingface_hub deprecation chatter
@pytest.mark.parametrize("spec", ["stabilityai/sd-vae-ft-ema", "madebyollin/taesd", "madebyollin/taef2"])
def test_unreachable_hub_fails_fast_naming_the_offline_choices(monkeypatch, tmp_path, spec):
    _unreachable_hub(monkeypatch, tmp_path)
    start = time.monotonic()
    with pytest.raises(AutoencoderUnavailable) as info:
        load_autoencoder(spec)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert spec in message and "cannot be reached" in message
    assert "taef2" in message and "pixel" in message and "local folder" in message
    assert "shared" not in message  # no path that exists only in decodiff's own repository
    assert isinstance(info.value, ValueError)  # the CLI reports ValueErrors as user errors


def test_behind_a_proxy_the_proxy_is_probed(monkeypatch):
    """A factory network may reach the hub only through a proxy: a direct probe would say
    'unreachable' although downloads work. A dead proxy is unreachable, and fast."""
    import socket

    from decodiff_cli.autoencoders import hub

    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.reachable(timeout=2)  # the proxy answers; the hub's own name never resolves here
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert not hub.reachable(timeout=2)


def test_hub_offline_variable_counts_as_unreachable(monkeypatch):
    from decodiff_cli.autoencoders import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub.reachable()


def test_hub_taef2_is_one_safetensors_file(monkeypatch):
    """`madebyollin/taef2` fetches `taef2.safetensors` and reads it like the packaged file."""
    import huggingface_hub

    from decodiff_cli.autoencoders import PACKAGED_TAEF2, hub

    asked = []

    def fake_download(repo, filename, local_files_only=False):
        asked.append((repo, filename, local_files_only))
        return str(PACKAGED_TAEF2)

    monkeypatch.setattr(hub, "reachable", lambda timeout=0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    ae = load_autoencoder("madebyollin/taef2")
    assert asked == [("madebyollin/taef2", "taef2.safetensors", False)]
    assert ae.latent_channels == 32 and ae.downsample == 8


def test_default_autoencoder_is_the_packaged_taef2():
    assert ModelConfig().autoencoder.spec == "taef2"
    ae = load_autoencoder("taef2")
    assert ae.kind == "taesd_folder" and ae.latent_channels == 32 and ae.downsample == 8


@pytest.mark.parametrize("spec", ["./no/such/folder", "/definitely/not/here/vae", "~/no-such-decodiff-vae-folder"])
def test_missing_local_folder_is_unavailable(spec):
    start = time.monotonic()
    with pytest.raises(AutoencoderUnavailable, match="no such autoencoder folder or .safetensors file"):
        load_autoencoder(spec)
    assert time.monotonic() - start < 5  # no hub lookup for a path


def test_folder_that_is_neither_layout_is_unavailable(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(AutoencoderUnavailable, match="config.json"):
        load_autoencoder(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(AutoencoderUnavailable, match="unreadable"):
        load_autoencoder(str(tmp_path))


def test_a_file_instead_of_a_folder_is_unavailable(tmp_path):
    f = tmp_path / "vae.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(AutoencoderUnavailable):
        load_autoencoder(str(f))


# ---------------------------------------------------------------------- diffusers KL


@pytest.fixture(scope="module")
def tiny_kl_folder(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    with torch.no_grad():  # GroupNorm starts as identity: randomise so mix-ups show
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny_kl")
    vae.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in vae.state_dict().items()}


def test_diffusers_folder_loads_with_its_weights(tiny_kl_folder):
    folder, saved = tiny_kl_folder
    ae = load_autoencoder(str(folder))
    assert ae.kind == "kl"
    assert ae.latent_channels == 4 and ae.downsample == 2
    assert all(not m.training for m in ae.vae.modules())  # the network itself is in eval mode
    assert all(not p.requires_grad for p in ae.parameters())
    state = ae.vae.state_dict()
    assert set(state) == set(saved)
    for k, v in saved.items():
        assert torch.equal(state[k].float(), v.float()), k
    x = _images(h=16, w=16)
    with torch.no_grad():
        z = ae.encode(x)
        y = ae.decode(z)
    assert z.shape == (2, 4, 8, 8)
    assert y.shape == (2, 3, 16, 16)
    assert float(y.min()) >= -1 and float(y.max()) <= 1
    with torch.no_grad():  # the encoder's mean: deterministic
        assert torch.equal(ae.encode(x), z)


def test_diffusers_folder_describe_rebuild_round_trip(tiny_kl_folder):
    folder, _ = tiny_kl_folder
    ae = load_autoencoder(str(folder))
    cfg = describe(ae, str(folder))
    assert cfg.kind == "kl" and cfg.latent_channels == 4 and cfg.downsample == 2
    stored = json.loads(json.dumps(ModelConfig(autoencoder=cfg).to_dict()))  # what config.json holds
    cfg2 = ModelConfig.from_dict(stored).autoencoder
    assert all(not k.startswith("_") for k in cfg2.architecture["config"])
    rebuilt = rebuild_autoencoder(cfg2)
    x = _images(h=16, w=16, seed=1)
    with torch.no_grad():
        before = rebuilt.encode(x)
        rebuilt.load_state_dict(ae.state_dict(), strict=True)
        assert not torch.allclose(before, ae.encode(x))  # random weights until the state dict
        assert torch.equal(rebuilt.encode(x), ae.encode(x))
        assert torch.equal(rebuilt.decode(ae.encode(x)), ae.decode(ae.encode(x)))
    assert rebuilt.latent_channels == 4 and rebuilt.downsample == 2


def test_diffusers_folder_with_broken_weights_is_unavailable(tiny_kl_folder, tmp_path):
    folder, _ = tiny_kl_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 32)
    with pytest.raises(AutoencoderUnavailable, match="pixel"):
        load_autoencoder(str(tmp_path))
