"""Weight import: readers, the bert / torchvision_resnet mappings, parity with PyTorch, strict errors."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tl_jax.cli import main  # noqa: E402
from tl_jax.models import get_model  # noqa: E402
from tl_jax.train.checkpoint import load_variables  # noqa: E402
from tl_jax.params.merge import merge_params  # noqa: E402
from tl_jax.weights import WeightMappingError, convert_weights, read_tensors  # noqa: E402

torch.set_num_threads(1)


# --- a torchvision-named ResNet, written out here (torchvision does not install beside torch 2.13) ---------
class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottle(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if stride != 1 or cin != 4 * planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(y)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    """torchvision.models.resnet layout and names, any width (``base_width=64`` is torchvision's)."""

    def __init__(self, block, stages, base_width: int = 4, num_classes: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = base_width
        for s, n in enumerate(stages):
            planes = base_width * 2**s
            blocks = []
            for i in range(n):
                blocks.append(block(cin, planes, 2 if (s > 0 and i == 0) else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)
        gen = torch.Generator().manual_seed(0)
        for m in self.modules():  # non-trivial BN statistics and affine params
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
                m.bias.data = torch.randn(m.num_features, generator=gen) * 0.1
                m.running_mean = torch.randn(m.num_features, generator=gen) * 0.1
                m.running_var = torch.rand(m.num_features, generator=gen) + 0.5

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def tl_logits(out_dir, model_name: str, x_nhwc: np.ndarray, **kwargs) -> np.ndarray:
    meta = json.loads((out_dir / "tl_jax_weights.json").read_text())
    model = get_model(model_name, meta["num_classes"], **meta["model_kwargs"], **kwargs)
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x))(load_variables(str(out_dir)), x_nhwc))


def test_torchvision_resnet18_parity_from_torch_safetensors_and_npz(tmp_path):
    ref = TorchResNet(Basic, (2, 2, 2, 2)).eval()
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "r18.safetensors")
    np.savez(tmp_path / "r18.npz", **{k: v.numpy() for k, v in sd.items()})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).numpy()
    outs = {}
    for ext in ("pth", "safetensors", "npz"):
        res = convert_weights(tmp_path / f"r18.{ext}", mapping="torchvision_resnet", model="resnet18",
                              out=tmp_path / f"ckpt_{ext}")
        assert res.num_classes == 7 and res.model_kwargs == {"base_width": 4, "stem": "imagenet"}
        assert sorted(res.dropped) == sorted(k for k in sd if k.endswith("num_batches_tracked"))
        outs[ext] = tl_logits(tmp_path / f"ckpt_{ext}", "resnet18", x.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(outs["pth"], want, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(outs["pth"], outs["safetensors"])
    np.testing.assert_array_equal(outs["pth"], outs["npz"])
    bn = load_variables(str(tmp_path / "ckpt_pth"))["batch_stats"]["backbone"]["layer2_0"]["downsample_bn"]
    np.testing.assert_array_equal(bn["var"], sd["layer2.0.downsample.1.running_var"].numpy())


@pytest.mark.slow
def test_torchvision_resnet50_parity(tmp_path):
    ref = TorchResNet(Bottle, (3, 4, 6, 3), base_width=4, num_classes=3).eval()
    torch.save(ref.state_dict(), tmp_path / "r50.pt")
    convert_weights(tmp_path / "r50.pt", mapping="torchvision_resnet", model="resnet50", out=tmp_path / "ck")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x).numpy()
    got = tl_logits(tmp_path / "ck", "resnet50", x.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_every_mismatch_is_listed(tmp_path):
    sd = {k: v.numpy() for k, v in TorchResNet(Basic, (2, 2, 2, 2)).state_dict().items()}
    bad = dict(sd)
    bad["extra.weight"] = np.zeros(3, np.float32)
    del bad["layer3.1.bn2.running_var"]
    bad["layer1.0.conv2.weight"] = np.zeros((4, 4, 5, 5), np.float32)
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(WeightMappingError) as e:
        convert_weights(tmp_path / "bad.npz", mapping="torchvision_resnet", model="resnet18", out=tmp_path / "o")
    msg = str(e.value)
    assert "(3 problem(s)" in msg
    assert "unused source tensor extra.weight (3,): no rule of mapping 'torchvision_resnet'" in msg
    assert "unfilled target batch_stats/backbone/layer3_1/bn2/var (16,)" in msg
    assert "shape mismatch: layer1.0.conv2.weight (4, 4, 5, 5) -> params/backbone/layer1_0/conv2/kernel" in msg
    assert not (tmp_path / "o").exists()
    # resnet50 names (conv3) do not fit a resnet18 target; and the other mapping's models are refused
    with pytest.raises(ValueError, match="converts into models"):
        convert_weights(tmp_path / "bad.npz", mapping="torchvision_resnet", model="bert", out=None)
    np.savez(tmp_path / "ok.npz", **sd)
    with pytest.raises(WeightMappingError, match="ignore rule 'nothing.*' matches no source tensor"):
        convert_weights(tmp_path / "ok.npz", mapping="torchvision_resnet", model="resnet18", out=None,
                        ignore=["nothing.*"])
    res = convert_weights(tmp_path / "ok.npz", mapping="torchvision_resnet", model="resnet18", out=None,
                          ignore=[r"fc\..*"])  # no classifier: the head is not a target
    assert "head" not in res.variables["params"] and "fc.weight" in res.dropped


def test_readers_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_tensors(tmp_path / "x.weird") if (tmp_path / "x.weird").write_text("x") else None
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="not a plain PyTorch state_dict"):
        read_tensors(tmp_path / "module.pt")
    torch.save({"state_dict": {"w": torch.ones(2, dtype=torch.bfloat16)}, "epoch": 3}, tmp_path / "ck.pt")
    out = read_tensors(tmp_path / "ck.pt")
    assert list(out) == ["w"] and out["w"].dtype == np.float32
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        read_tensors(tmp_path / "junk.safetensors")


def test_safetensors_memory_mapped_equal_to_safetensors_own_reader(tmp_path):
    from safetensors.numpy import load_file, save_file

    from tl_jax.weights.readers import detached

    rng = np.random.default_rng(0)
    tensors = {"f32": rng.normal(size=(3, 5)).astype(np.float32), "f16": rng.normal(size=(4,)).astype(np.float16),
               "f64": rng.normal(size=(2, 2, 2)), "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
               "u8": np.arange(7, dtype=np.uint8), "mask": np.array([True, False]),
               "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "np"})
    got, ref = read_tensors(tmp_path / "t.safetensors"), load_file(str(tmp_path / "t.safetensors"))
    assert set(got) == set(ref) == set(tensors)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)
    assert isinstance(got["f32"], np.memmap) and not got["f32"].flags.writeable  # a view of the file, read-only
    kept = detached(got["f32"].T)  # a transposed view of the file -> an owned C-order copy
    assert not isinstance(kept, np.memmap) and kept.base is None and kept.flags.c_contiguous
    np.testing.assert_array_equal(kept, tensors["f32"].T)
    own = np.ones(3)
    assert detached(own) is own and detached(own[1:]).base is own  # not of a file: unchanged


def test_safetensors_bad_headers_are_one_line(tmp_path):
    import json
    import struct

    from safetensors.numpy import save_file

    def write(name, header, data=b"\0" * 16):
        raw = json.dumps(header).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return tmp_path / name

    cases = {
        "short.safetensors": (b"abc", "shorter than its 8-byte header"),
        "len.safetensors": (struct.pack("<Q", 10 ** 9) + b"{}", "header length 1000000000 does not fit"),
        "off.safetensors": (write("off.safetensors", {"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}),
                            r"tensor w: bytes 0..32 do not hold \(8,\) float32"),
        "dtype.safetensors": (write("dtype.safetensors", {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}),
                              "tensor w has dtype C64"),
        "list.safetensors": (write("list.safetensors", [1, 2]), "has no attribute 'items'"),
        "json.safetensors": (struct.pack("<Q", 4) + b"{{{{", "Expecting property name"),
        "empty.safetensors": (b"", "cannot mmap an empty file"),
    }
    for name, (content, message) in cases.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a readable .safetensors file .*{message}"):
            read_tensors(tmp_path / name)
    import ml_dtypes

    save_file({"w": np.array([1.5, -2.0], ml_dtypes.bfloat16)}, str(tmp_path / "bf16.safetensors"))
    bf = read_tensors(tmp_path / "bf16.safetensors")["w"]  # no numpy dtype: through safetensors, as float32
    assert bf.dtype == np.float32 and bf.tolist() == [1.5, -2.0]


def test_converted_weights_do_not_view_the_source_file(tmp_path):
    from safetensors.torch import save_file

    ref = TorchResNet(Basic, (2, 2, 2, 2)).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "r.safetensors"))
    res = convert_weights(tmp_path / "r.safetensors", mapping="torchvision_resnet", model="resnet18", out=None)
    leaves = jax.tree_util.tree_leaves(res.variables)
    assert leaves and not any(isinstance(x, np.memmap) or isinstance(x.base, np.memmap) for x in leaves)
    before = [np.array(x) for x in leaves]
    (tmp_path / "r.safetensors").write_bytes(b"\0" * (tmp_path / "r.safetensors").stat().st_size)  # file changed
    for a, b in zip(before, jax.tree_util.tree_leaves(res.variables)):
        np.testing.assert_array_equal(a, b)


# --- Hugging Face BERT ---------------------------------------------------------------------------------------
def tiny_bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=24, max_position_embeddings=20, hidden_act="gelu", **kw)


def token_batch(vocab: int = 50):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids * mask, mask


def test_hf_bert_parity_pooler_and_classifier(tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    ref = BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()
    ref.save_pretrained(tmp_path / "hf")  # model.safetensors (names 'bert.*', 'classifier.*') + config.json
    res = convert_weights(tmp_path / "hf" / "model.safetensors", mapping="bert", model="bert",
                          out=tmp_path / "ck", model_kwargs={"pooling": "pooler"})
    assert res.num_classes == 3 and res.model_kwargs["num_heads"] == 4 and res.model_kwargs["num_layers"] == 2
    ids, mask = token_batch()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model = get_model("bert", 3, **res.model_kwargs)
    got = jax.jit(model.apply)(load_variables(str(tmp_path / "ck")), ids, mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_hf_bert_mean_pooling_parity_and_init_from(tmp_path):
    from safetensors.torch import save_file
    from transformers import BertModel

    torch.manual_seed(1)
    ref = BertModel(tiny_bert_config()).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "enc.safetensors")
    with pytest.raises(WeightMappingError, match="pooler.dense.weight .* which the model lacks"):
        convert_weights(tmp_path / "enc.safetensors", mapping="bert", model="bert", out=None,
                        model_kwargs={"num_heads": 4})
    res = convert_weights(tmp_path / "enc.safetensors", mapping="bert", model="bert", out=tmp_path / "ck",
                          model_kwargs={"num_heads": 4}, ignore=[r"pooler\..*"])
    ids, mask = token_batch()
    with torch.no_grad():
        h = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    want = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    model = get_model("bert", 2, **res.model_kwargs)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, mask)
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    params = merge_params(load_variables(str(tmp_path / "ck"))["params"], fresh["params"], ["head/.*"])
    got = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method=model.embed))(params, ids, mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_cli_convert_and_inspect(tmp_path, capsys):
    sd = TorchResNet(Basic, (2, 2, 2, 2)).state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    assert main(["weights", "inspect", str(tmp_path / "r18.pth")]) == 0
    assert "layer1.0.conv1.weight (4, 4, 3, 3) float32" in capsys.readouterr().out
    args = ["weights", "convert", "--from", str(tmp_path / "r18.pth"), "--mapping", "torchvision_resnet",
            "--model", "resnet18", "--out", str(tmp_path / "ck")]
    assert main(args) == 0
    assert "--config.init_from=" in capsys.readouterr().out
    assert load_variables(str(tmp_path / "ck"))["params"]["head"]["kernel"].shape == (32, 7)
    assert main(args) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--model-kwargs", '{"stem": "cifar"}']) == 2
    err = capsys.readouterr().err
    assert "shape mismatch: conv1.weight (4, 3, 7, 7) -> params/backbone/conv1/kernel" in err


@pytest.mark.parametrize("kwargs", [
    {"depth": 12, "pooling": "map", "layer_scale": 0.1, "num_registers": 2},
    {"depth": 3, "act": "swiglu", "pre_norm": True, "projection_dim": 8, "dist_token": True, "pooling": "cls_dist"}])
def test_target_shapes_of_one_traced_block_equal_the_full_trace(kwargs):
    from tl_jax.weights.convert import _traced_shapes, target_shapes

    kw = {"patch_size": 4, "hidden_size": 32, "num_heads": 2, "mlp_dim": 64, **kwargs}
    sample = ((np.zeros((1, 16, 16, 3), np.float32),), {})
    fast, full = target_shapes("vit", 5, kw, sample), _traced_shapes("vit", 5, kw, sample)
    assert list(fast) == list(full) and f"params/backbone/encoderblock_{kw['depth'] - 1}/LayerNorm_0/scale" in fast
    assert [(v.shape, v.dtype) for v in fast.values()] == [(v.shape, v.dtype) for v in full.values()]


@pytest.mark.parametrize("shape", [(130, 70), (64, 3), (1, 5)])
def test_transposed_is_a_contiguous_transpose(shape):
    from tl_jax.weights.mappings import transposed

    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = transposed(x)
    assert got.flags.c_contiguous and got.dtype == x.dtype
    np.testing.assert_array_equal(got, x.T)
