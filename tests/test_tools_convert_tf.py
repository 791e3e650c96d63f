"""TF checkpoint conversion: reference variable names -> our models, checked against TensorFlow.

The TF side is written here from the reference specification (sections 2.3, 3, 5, 6 of
``sact-reference.md``) with plain ``tf`` ops in eager mode: the variable names are produced
by nested scopes as the reference's TF-Slim code creates them, the random values are saved
with ``tf.compat.v1.train.Saver`` and converted, and the TF forward pass (stem, units,
halting branches, the SACT/ACT recurrence, head, FLOPs) is compared with ours.

Needs ``tensorflow-cpu`` (skipped otherwise).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if importlib.util.find_spec("tensorflow") is None:  # not importorskip: TF must load after triton
    pytest.skip("needs tensorflow-cpu", allow_module_level=True)
from sact.tools.convert_tf import import_tensorflow  # noqa: E402

tf = import_tensorflow()  # loads triton first: triton imported after TF segfaults (clashing LLVM)

import sact  # noqa: E402
import sact.cli  # noqa: E402
import sact.data  # noqa: E402
from sact.tools.convert_tf import TFCheckpointMismatch, convert_arrays, convert_tf_checkpoint  # noqa: E402

torch.set_num_threads(1)
EPS_HALT = 0.01


# --------------------------------------------------------------------------- TF reference
class Vars:
    """Variables by full scope name; ``get`` creates a random value on first use (like ``tf.get_variable``)."""

    def __init__(self, seed: int, values: dict | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.values = {} if values is None else values
        self.path: list[str] = []

    @contextlib.contextmanager
    def scope(self, name: str):
        self.path.append(name)
        try:
            yield
        finally:
            self.path.pop()

    def get(self, name: str, shape, init: str) -> tf.Tensor:
        full = "/".join([*self.path, name])
        if full not in self.values:
            r = self.rng
            shape = tuple(shape)
            if init == "weights":  # HWIO; small enough that 16 residual units stay bounded
                v = r.normal(0, 0.6 / np.sqrt(np.prod(shape[:-1])), shape)
            elif init == "bias":
                v = r.normal(0, 0.1, shape)
            elif init == "halt_bias":  # around 0 so that positions halt after different units
                v = r.normal(0.3, 0.3, shape)
            elif init in ("gamma", "var"):
                v = r.uniform(0.5, 1.5, shape)
            else:  # beta, mean
                v = r.normal(0, 0.2, shape)
            self.values[full] = v.astype(np.float32)
        assert self.values[full].shape == tuple(shape), full
        return tf.constant(self.values[full])


def tf_bn(x, V: Vars, name: str, eps: float):
    c = x.shape[-1]
    with V.scope(name):
        return tf.nn.batch_normalization(
            x, V.get("moving_mean", [c], "mean"), V.get("moving_variance", [c], "var"),
            V.get("beta", [c], "beta"), V.get("gamma", [c], "gamma"), eps)


def tf_conv(x, V: Vars, name: str, k: int, out: int, *, stride=1, padding="SAME", bias=False, bn_eps=None,
            mask=None, halt_bias=False):
    """slim.conv2d-like: weights (+ biases | + BatchNorm); returns (y, flops [B])."""
    with V.scope(name):
        y = tf.nn.conv2d(x, V.get("weights", [k, k, x.shape[-1], out], "weights"), stride, padding)
        if bias:
            y = y + V.get("biases", [out], "halt_bias" if halt_bias else "bias")
        if bn_eps is not None:
            y = tf_bn(y, V, "BatchNorm", bn_eps)
    if mask is None:
        positions = tf.fill([x.shape[0]], tf.constant(float(y.shape[1] * y.shape[2]), tf.float64))
    else:
        positions = tf.cast(tf.reduce_sum(mask, [1, 2, 3]), tf.float64)
    return y, 2 * positions * k * k * int(x.shape[-1]) * out  # float64: exact


def tf_conv_same(x, V, name, k, out, stride, **kw):
    """TF-Slim conv2d_same: SAME for stride 1, else explicit symmetric pad then VALID."""
    if stride == 1:
        return tf_conv(x, V, name, k, out, **kw)
    p = k - 1
    x = tf.pad(x, [[0, 0], [p // 2, p - p // 2], [p // 2, p - p // 2], [0, 0]])
    return tf_conv(x, V, name, k, out, stride=stride, padding="VALID", **kw)


def dilate(mask):
    return None if mask is None else tf.nn.max_pool2d(mask, 3, 1, "SAME")


def lrelu(x):
    return tf.maximum(x, 0.1 * x)


def tf_halting(x, V, sact_mode: bool, eps: float, act, mask):
    """Halting branch (spec section 3): returns (h [B,H,W] or [B], flops [B])."""
    with V.scope("halting_proba"):
        g = tf.reduce_mean(x, [1, 2], keepdims=True)
        g = act(tf_bn(g, V, "global_bn", eps))
        if sact_mode:
            local = act(tf_bn(x, V, "local_bn", eps))
            logit, f1 = tf_conv(local, V, "local_conv", 3, 1, bias=True, halt_bias=True, mask=mask)
            glog, f2 = tf_conv(g, V, "global_conv", 1, 1)
            return tf.sigmoid(logit + glog)[..., 0], f1 + f2
        logit, f = tf_conv(g, V, "global_conv", 1, 1, bias=True, halt_bias=True)
        return tf.sigmoid(logit)[:, 0, 0, 0], f


def tf_block(x, V, units, mode: str, eps: float, act):
    """One block with the reference recurrence (spec 2.2 / 2.3). ``units``: list of unit fns
    ``(x, mask) -> (y, flops)``. Returns (out, ponder, num_units, flops)."""
    b = x.shape[0]
    if mode == "vanilla":
        flops = 0.0
        for u, fn in enumerate(units):
            with V.scope(f"unit_{u + 1}"):
                x, f = fn(x, None)
            flops += f
        return x, None, None, flops
    sact_mode = mode == "sact"
    out, flops = 0.0, 0.0
    n = len(units)
    for u, fn in enumerate(units):
        with V.scope(f"unit_{u + 1}"):
            if u == 0:
                x, f = fn(x, None)
                sh = x.shape[:3] if sact_mode else [b]
                cs, fin, rem = tf.zeros(sh), tf.zeros(sh, bool), tf.ones(sh)
                pc, nu = tf.ones(sh), tf.zeros(sh, tf.int32)
                mask = None
            else:
                m = tf.cast(tf.logical_not(fin), tf.float32)
                # SACT: per-position mask; ACT: the units run unmasked (all of them, every image)
                mask = m[..., None] if sact_mode else None
                x, f = fn(x, mask)
            if u < n - 1:
                h, fh = tf_halting(x, V, sact_mode, eps, act, mask)
                f = f + fh
            else:
                h = tf.ones(sh)
        if sact_mode:
            flops += f  # units count their own masked FLOPs
        else:
            flops += f * tf.cast(tf.logical_not(fin), tf.float64) if u > 0 else f
        cs = cs + h
        cur = cs >= 1 - EPS_HALT
        h = tf.where(cur, 0.0, h)
        just = tf.logical_and(cur, tf.logical_not(fin))
        d = tf.where(just, rem, h)
        pc = pc + tf.where(cur, tf.where(just, rem, 0.0), 1.0)
        nu = nu + tf.cast(tf.logical_not(fin), tf.int32)
        out = out + (d[..., None] if sact_mode else d[:, None, None, None]) * x
        rem = rem - h
        fin = cur
    return out, pc, nu, flops


def tf_imagenet(x, V, layers, base, num_classes, mode):
    """imagenet_model (spec 5.2) under scope resnet_v2; returns (logits, [(ponder, num_units)], flops)."""
    eps = 1e-5
    relu = tf.nn.relu

    def bottleneck(depth, db, stride):
        def fn(x, mask):
            with V.scope("bottleneck_v2"):
                flops = 0.0
                preact = relu(tf_bn(x, V, "preact", eps))
                if depth == x.shape[-1]:
                    shortcut = x[:, ::stride, ::stride] if stride > 1 else x
                else:
                    shortcut, f = tf_conv(preact, V, "shortcut", 1, depth, stride=stride, bias=True)
                    flops += f
                r, f = tf_conv(preact, V, "conv1", 1, db, bn_eps=eps, mask=dilate(mask))
                flops += f
                r, f = tf_conv_same(relu(r), V, "conv2", 3, db, stride, bn_eps=eps, mask=mask)
                flops += f
                r, f = tf_conv(relu(r), V, "conv3", 1, depth, bias=True, mask=mask)
                flops += f
                if mask is not None:
                    r = r * mask
                return shortcut + r, flops
        return fn

    maps = []
    with V.scope("resnet_v2"):
        net, flops = tf_conv_same(x, V, "conv1", 7, 64, 2, bias=True)
        net = tf.nn.max_pool2d(net, 3, 2, "SAME")
        for i, n in enumerate(layers):
            w = base * 2**i
            units = [bottleneck(4 * w, w, 2 if (i > 0 and u == 0) else 1) for u in range(n)]
            with V.scope(f"block{i + 1}"):
                net, pc, nu, f = tf_block(net, V, units, mode, eps, lambda t: t)
            maps.append((pc, nu))
            flops += f
        net = tf.reduce_mean(relu(tf_bn(net, V, "postnorm", eps)), [1, 2], keepdims=True)
        logits, f = tf_conv(net, V, "logits", 1, num_classes, bias=True)
    return logits[:, 0, 0], maps, flops + f


def tf_cifar(x, V, layers, bc, num_classes, mode):
    """cifar_model (spec 5.1) under scope resnet_residual."""
    eps = 1e-3

    def residual(depth, stride, abr):
        def fn(x, mask):
            with V.scope("residual"):
                din = x.shape[-1]
                preact = lrelu(tf_bn(x, V, "preact", eps))
                shortcut = preact if abr else x
                # arg scope: lrelu inside batch_norm and again as the conv activation
                c, f1 = tf_conv(preact, V, "conv1", 3, depth, stride=stride, bn_eps=eps, mask=dilate(mask))
                c = lrelu(lrelu(c))
                c, f2 = tf_conv(c, V, "conv2", 3, depth, bias=True, mask=mask)
                if din != depth:
                    shortcut = tf.nn.avg_pool2d(shortcut, stride, stride, "VALID")
                    p = (depth - din) // 2
                    shortcut = tf.pad(shortcut, [[0, 0], [0, 0], [0, 0], [p, p]])
                if mask is not None:
                    c = c * mask
                return shortcut + c, f1 + f2
        return fn

    maps = []
    with V.scope("resnet_residual"):
        net, flops = tf_conv(x, V, "Conv", 3, bc, bias=True)
        for i, n in enumerate(layers):
            d = bc * 2**i
            units = [residual(d, 2 if (i > 0 and u == 0) else 1, i == 0 and u == 0) for u in range(n)]
            with V.scope(f"block_{i + 1}"):
                net, pc, nu, f = tf_block(net, V, units, mode, eps, lrelu)
            maps.append((pc, nu))
            flops += f
        net = lrelu(tf_bn(tf.reduce_mean(net, [1, 2], keepdims=True), V, "BatchNorm", eps))
        logits, f = tf_conv(net, V, "logits", 1, num_classes, bias=True)
    return logits[:, 0, 0], maps, flops + f


def save_tf_checkpoint(values: dict, prefix: str, *, extras: bool = True) -> str:
    """Write ``values`` with tf.compat.v1 Saver under exactly these names (+ optimizer slots)."""
    values = dict(values)
    if extras:  # what an unsqueezed training checkpoint also holds
        values["global_step"] = np.array(1000, np.int64)
        for name in list(values)[:3]:
            values[f"{name}/Momentum"] = np.zeros_like(values[name])
    g = tf.Graph()
    with g.as_default():
        var_list = {n: tf.compat.v1.Variable(v, name=f"v{i}") for i, (n, v) in enumerate(values.items())}
        saver = tf.compat.v1.train.Saver(var_list=var_list)
        with tf.compat.v1.Session(graph=g) as s:
            s.run(tf.compat.v1.global_variables_initializer())
            return saver.save(s, prefix, write_meta_graph=False)


# --------------------------------------------------------------------------- fixtures
IMAGENET = dict(name="resnet50_v2", layers=(3, 4, 6, 3), width=4, size=64, classes=11)
CIFAR = dict(name="resnet20_cifar", layers=(3, 3, 3), width=4, size=16, classes=10)


def make_reference(kind: str, mode: str, seed: int = 0):
    """(values, x NHWC, tf outputs) for a small reference network with random variables."""
    cfg = IMAGENET if kind == "imagenet" else CIFAR
    V = Vars(seed)
    x = np.random.default_rng(seed + 100).normal(0, 1, (2, cfg["size"], cfg["size"], 3)).astype(np.float32)
    fn = tf_imagenet if kind == "imagenet" else tf_cifar
    out = fn(tf.constant(x), V, cfg["layers"], cfg["width"], cfg["classes"], mode)
    return V.values, x, out


def ours_kwargs(kind):
    cfg = IMAGENET if kind == "imagenet" else CIFAR
    width = {"base_width": cfg["width"]} if kind == "imagenet" else {"base_channels": cfg["width"]}
    return cfg["name"], {**width, "num_classes": cfg["classes"]}


def assert_matches_tf(model, x, tf_out, mode):
    logits, maps, flops = tf_out
    with torch.no_grad():
        out = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    np.testing.assert_allclose(out.logits.numpy(), logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out.flops.numpy().astype(np.float64), flops.numpy().astype(np.float64))
    if mode == "vanilla":
        return
    varied = False
    for stage, (pc, nu) in zip(out.stages, maps):
        if mode == "act":
            pc, nu = pc.numpy()[:, None, None], nu.numpy()[:, None, None]
        np.testing.assert_array_equal(stage.num_units.numpy(), np.broadcast_to(nu, stage.num_units.shape))
        np.testing.assert_allclose(stage.ponder_map.numpy(), np.broadcast_to(pc, stage.ponder_map.shape), rtol=1e-5,
                                   atol=1e-5)
        varied |= bool((stage.num_units != stage.num_units.flatten()[0]).any())
        assert (stage.num_units < stage.halting_distribution.shape[1]).any(), "nothing halted early: the test would not check halting"
    assert varied or mode == "act", "halting is uniform: masks are not exercised"


def fingerprint(a: np.ndarray) -> tuple:
    return tuple(np.round(np.sort(a.ravel()), 5))


def assert_bijection(values: dict, model):
    """Every TF array equals exactly one of our tensors up to layout, and every tensor got one."""
    ours = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    by_print: dict[tuple, list[str]] = {}
    for k, v in ours.items():
        by_print.setdefault(fingerprint(v), []).append(k)
    assert len(ours) == len(values)
    for name, v in values.items():
        hits = by_print.get(fingerprint(v), [])
        assert len(hits) == 1, f"{name}: matched {hits}"


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind,mode", [("imagenet", "sact"), ("imagenet", "act"), ("cifar", "sact")])
def test_convert_and_match_tensorflow(tmp_path, kind, mode):
    values, x, tf_out = make_reference(kind, mode)
    prefix = save_tf_checkpoint(values, str(tmp_path / "tf" / "model.ckpt-1000"))
    name, kw = ours_kwargs(kind)
    model = convert_tf_checkpoint(prefix, model=name, mode=mode, out=tmp_path / "out", tau=0.005)
    assert_bijection(values, model)
    assert_matches_tf(model, x, tf_out, mode)
    # the written checkpoint rebuilds the same model with the reference preprocessing
    loaded = sact.load_checkpoint(tmp_path / "out")
    assert loaded.sact_config["kwargs"] == {"mode": mode, **kw, "in_chans": 3,
                                            **({"stem_width": 64} if kind == "imagenet" else {})}
    meta = loaded.checkpoint_meta
    assert meta["tau"] == 0.005 and meta["source"]["prefix"] == prefix
    assert meta["config"]["dataset"] == ("imagenet" if kind == "imagenet" else "cifar10")
    assert meta["source"]["ignored_variables"] == 4  # global_step + 3 Momentum slots
    expected = sact.data.imagenet_preprocess() if kind == "imagenet" else sact.data.cifar_preprocess()
    assert sact.data.Preprocess.from_dict(meta["preprocess"]) == expected
    assert_matches_tf(loaded, x, tf_out, mode)
    # the sparse engine reproduces the reference too: row kernels only (no dense path), and the dense
    # path everywhere (float32: unit 0 and the units' convolutions on oneDNN's packed weights, sparse.dnn)
    assert_matches_tf(sact.to_sparse(loaded, dense_above=1.0, poison=True), x, tf_out, mode)
    assert_matches_tf(sact.to_sparse(loaded, dense_above=-1.0, poison=True), x, tf_out, mode)


def test_imagenet_names_and_layouts(tmp_path):
    """Spot checks written out by hand: TF name -> our tensor, layout transposed."""
    values, _, _ = make_reference("imagenet", "sact", seed=3)
    name, kw = ours_kwargs("imagenet")
    model = sact.create_model(name, mode="sact", **kw)
    convert_arrays(values, model)
    sd = model.state_dict()
    u = "resnet_v2/block2/unit_1/bottleneck_v2"
    checks = {
        "conv1.weight": values["resnet_v2/conv1/weights"].transpose(3, 2, 0, 1),
        "conv1.bias": values["resnet_v2/conv1/biases"],
        "block2.0.shortcut.weight": values[f"{u}/shortcut/weights"].transpose(3, 2, 0, 1),
        "block2.0.shortcut.bias": values[f"{u}/shortcut/biases"],
        "block2.0.preact.running_var": values[f"{u}/preact/moving_variance"],
        "block2.0.conv2.weight": values[f"{u}/conv2/weights"].transpose(3, 2, 0, 1),
        "block2.0.conv2_bn.weight": values[f"{u}/conv2/BatchNorm/gamma"],
        "block2.0.conv2_bn.running_mean": values[f"{u}/conv2/BatchNorm/moving_mean"],
        "block2.0.conv3.bias": values[f"{u}/conv3/biases"],
        "block3.halting.4.local_conv.weight": values["resnet_v2/block3/unit_5/halting_proba/local_conv/weights"]
        .transpose(3, 2, 0, 1),
        "block3.halting.4.global_bn.bias": values["resnet_v2/block3/unit_5/halting_proba/global_bn/beta"],
        "block3.halting.4.global_conv.weight": values["resnet_v2/block3/unit_5/halting_proba/global_conv/weights"]
        .transpose(3, 2, 0, 1),
        "postnorm.weight": values["resnet_v2/postnorm/gamma"],
        "logits.weight": values["resnet_v2/logits/weights"][0, 0].T,
        "logits.bias": values["resnet_v2/logits/biases"],
    }
    for key, want in checks.items():
        np.testing.assert_array_equal(sd[key].numpy(), want, err_msg=key)
    assert "resnet_v2/block1/unit_3/halting_proba/local_bn/gamma" not in values  # last unit: no branch
    assert "resnet_v2/block1/unit_2/bottleneck_v2/shortcut/weights" not in values  # identity shortcut


def test_cifar_names(tmp_path):
    values, _, _ = make_reference("cifar", "sact", seed=4)
    name, kw = ours_kwargs("cifar")
    model = sact.create_model(name, mode="sact", **kw)
    convert_arrays(values, model)
    sd = model.state_dict()
    r = "resnet_residual/block_2/unit_1/residual"
    np.testing.assert_array_equal(sd["stem.weight"].numpy(), values["resnet_residual/Conv/weights"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(sd["stem.bias"].numpy(), values["resnet_residual/Conv/biases"])
    np.testing.assert_array_equal(sd["layer2.0.bn1.running_mean"].numpy(), values[f"{r}/preact/moving_mean"])
    np.testing.assert_array_equal(sd["layer2.0.bn2.weight"].numpy(), values[f"{r}/conv1/BatchNorm/gamma"])
    np.testing.assert_array_equal(sd["layer2.0.conv2.bias"].numpy(), values[f"{r}/conv2/biases"])
    np.testing.assert_array_equal(sd["head_bn.bias"].numpy(), values["resnet_residual/BatchNorm/beta"])
    np.testing.assert_array_equal(sd["fc.weight"].numpy(), values["resnet_residual/logits/weights"][0, 0].T)
    np.testing.assert_array_equal(sd["layer1.halting.1.local_conv.bias"].numpy(),
                                  values["resnet_residual/block_1/unit_2/halting_proba/local_conv/biases"])


def test_mismatches_are_listed(tmp_path):
    values, _, _ = make_reference("imagenet", "sact", seed=5)
    name, kw = ours_kwargs("imagenet")
    bad = dict(values)
    del bad["resnet_v2/block2/unit_3/bottleneck_v2/conv1/BatchNorm/moving_variance"]
    bad["resnet_v2/block5/unit_1/bottleneck_v2/conv1/weights"] = np.zeros((1, 1, 2, 2), np.float32)
    bad["resnet_v2/logits/biases"] = np.zeros(7, np.float32)
    bad["resnet_v2/conv1/weights/Momentum"] = np.zeros(1, np.float32)  # ignored
    bad["global_step"] = np.array(3)
    with pytest.raises(TFCheckpointMismatch) as err:
        convert_arrays(bad, sact.create_model(name, mode="sact", **kw))
    e = err.value
    assert [m.split(" ")[0] for m in e.missing] == ["resnet_v2/block2/unit_3/bottleneck_v2/conv1/BatchNorm/moving_variance"]
    assert e.unexpected == ["resnet_v2/block5/unit_1/bottleneck_v2/conv1/weights"]
    assert len(e.wrong_shape) == 1 and "resnet_v2/logits/biases: checkpoint (7,) vs model (11,)" in e.wrong_shape[0]
    msg = str(e)
    assert "missing (1)" in msg and "unexpected (1)" in msg and "wrong shape (1)" in msg
    # a vanilla checkpoint has no halting branches: refused for sact unless asked for fresh branches
    vanilla, _, _ = make_reference("imagenet", "vanilla", seed=5)
    sact_model = sact.create_model(name, mode="sact", **kw)
    with pytest.raises(TFCheckpointMismatch, match="halting_proba/local_conv/weights"):
        convert_arrays(vanilla, sact_model)
    before = sact_model.block1.halting[0].local_conv.bias.clone()
    report = convert_arrays(vanilla, sact_model, fresh_halting=True)
    assert report["fresh"] and all(".halting." in k for k in report["fresh"])
    assert torch.equal(sact_model.block1.halting[0].local_conv.bias, before)


def test_cli_and_scope_guess(tmp_path, capsys):
    values, x, tf_out = make_reference("imagenet", "vanilla", seed=6)
    # slim's own resnet_v2_101-style top scope is found automatically
    renamed = {n.replace("resnet_v2/", "resnet_v2_50/", 1): v for n, v in values.items()}
    prefix = save_tf_checkpoint(renamed, str(tmp_path / "tf" / "model.ckpt-7"))
    rc = sact.cli.main(["convert-tf", str(tmp_path / "tf"), "--model", "resnet50_v2", "--mode", "vanilla",
                        "--out", str(tmp_path / "out")])
    assert rc == 0
    assert "scope 'resnet_v2_50'" in capsys.readouterr().out
    model = sact.load_checkpoint(tmp_path / "out")
    assert model.checkpoint_meta["source"]["prefix"] == prefix
    assert "label_offset" not in model.checkpoint_meta  # 11 classes: no background class to skip
    assert_matches_tf(model, x, tf_out, "vanilla")
    rc = sact.cli.main(["convert-tf", prefix, "--model", "resnet50_v2", "--mode", "sact", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing" in err and "halting_proba" in err  # bad input: exit 2
    assert not (tmp_path / "o2").exists()
    assert sact.cli.main(["convert-tf", str(tmp_path / "nothing"), "--model", "resnet50_v2", "--mode", "sact",
                          "--out", str(tmp_path / "o3")]) == 2
    assert sact.cli.main(["convert-tf", prefix, "--model", "resnet50", "--mode", "vanilla",
                          "--out", str(tmp_path / "o4")]) == 2
    assert "no TF counterpart" in capsys.readouterr().err


def test_cifar_preprocess_matches_tf():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    want = tf.image.per_image_standardization(tf.constant(img.astype(np.float32))).numpy().transpose(2, 0, 1)
    np.testing.assert_allclose(sact.data.cifar_preprocess()(img).numpy(), want, rtol=1e-5, atol=1e-5)


def test_imagenet_preprocess_matches_tf():
    img = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    t = tf.image.convert_image_dtype(tf.constant(img), tf.float32)
    t = tf.image.central_crop(t, 0.875)
    t = tf.compat.v1.image.resize_bilinear(t[None], [224, 224], align_corners=False)[0]
    want = ((t - 0.5) * 2.0).numpy().transpose(2, 0, 1)
    np.testing.assert_allclose(sact.data.imagenet_preprocess()(img).numpy(), want, atol=1e-4)
