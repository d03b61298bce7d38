"""Transferability scores against independent numpy transcriptions of the papers' algorithms.

LogME: the authors' original per-class loop (SVD of FᵀF, α/β updated until convergence), and
a direct numerical maximisation of the Gaussian marginal likelihood over (log α, log β);
LEEP, NCE, H-score, TransRate: the papers' formulas written with explicit loops/dicts.
Plus properties (perfect source, identical labels, separable > random, scale invariance),
Transfer-Learning-Library's transcriptions used by ``make bench``, and bad input.
"""
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from tl_jax.transferability import h_score, ledoit_wolf_shrinkage, leep, logme, nce, transrate


# -- independent references -------------------------------------------------------------------------------------
def logme_reference(f, y, tol=1e-10, max_iter=1000, eps=0.0):
    """You et al.'s original LogME (github.com/thuml/LogME, ``LogME_basic``/``each_evidence``): an SVD of FᵀF
    (D x D), then per class
    the loop m = V diag(β/(α+βs)) Vᵀ Fᵀy, α = γ/‖m‖², β = (N−γ)/‖y − F m‖².
    The authors stop at a 1% change of α/β (≤ 11 steps); here the loop runs to ``tol`` to reach the fixed point.
    ``eps``: the authors add 1e-5 to both norms (Transfer-Learning-Library does not); tl_jax follows the
    latter, as the evidence is then invariant to the features' scale."""
    f = f.astype(np.float64)
    fh = f
    f = f.T
    d, n = f.shape
    v, s, vh = np.linalg.svd(f @ fh, full_matrices=True)
    evidences = []
    for c in range(int(y.max()) + 1):
        y_ = (y == c).astype(np.float64)
        alpha, beta = 1.0, 1.0
        lam = alpha / beta
        tmp = vh @ (f @ y_)
        for _ in range(max_iter):
            gamma = (s / (s + lam)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / (alpha_de + eps)
            beta_de = ((y_ - fh @ m) ** 2).sum()
            beta = (n - gamma) / (beta_de + eps)
            new_lam = alpha / beta
            if np.abs(new_lam - lam) / lam < tol:
                break
            lam = new_lam
        evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * s))
                    - beta / 2.0 * (beta_de + eps) - alpha / 2.0 * (alpha_de + eps) - n / 2.0 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def log_marginal_likelihood(f, y, log_alpha, log_beta):
    """log N(y; 0, β⁻¹ I_N + α⁻¹ F Fᵀ) / N: the evidence of ``y = F w + noise``, w ~ N(0, α⁻¹ I), by its definition
    (a Cholesky factor of the N x N covariance; no eigendecomposition, no posterior mean)."""
    n = len(y)
    cov = np.exp(-log_beta) * np.eye(n) + np.exp(-log_alpha) * f @ f.T
    try:
        chol = scipy.linalg.cho_factor(cov, lower=True)
    except np.linalg.LinAlgError:
        return -np.inf
    quad = y @ scipy.linalg.cho_solve(chol, y)
    log_det = 2 * np.log(np.diag(chol[0])).sum()
    return (-0.5 * quad - 0.5 * log_det - n / 2 * np.log(2 * np.pi)) / n


def max_evidence_reference(f, y, box=(-30.0, 60.0)):
    """Mean over classes of the maximum of :func:`log_marginal_likelihood` over (log α, log β) in ``box``²:
    Nelder-Mead from the 3 best points of a 46 x 46 grid (steps of 2). A supremum at α → ∞ (features useless
    for a class) or β → ∞ (noise-free interpolation, N ≤ D) is approached at the box's edge, within ~e^-60 of
    its limit."""
    grid = np.linspace(*box, 46)
    out = []
    for c in np.unique(y):
        yc = (y == c).astype(np.float64)

        def neg(z):
            value = log_marginal_likelihood(f, yc, *np.clip(z, *box))
            return -value if np.isfinite(value) else 1e300

        starts = sorted(((a, b) for a in grid for b in grid), key=neg)[:3]
        out.append(-min(scipy.optimize.minimize(neg, x0, method="Nelder-Mead",
                                                options={"xatol": 1e-9, "fatol": 1e-14, "maxfev": 10000}).fun
                        for x0 in starts))
    return float(np.mean(out))


def leep_reference(theta, y):
    n, z_count = theta.shape
    classes = sorted(set(y.tolist()))
    joint = {(yy, z): sum(theta[i, z] for i in range(n) if y[i] == yy) / n for yy in classes for z in range(z_count)}
    marg = {z: sum(joint[(yy, z)] for yy in classes) for z in range(z_count)}
    total = 0.0
    for i in range(n):
        total += np.log(sum(joint[(y[i], z)] / marg[z] * theta[i, z] for z in range(z_count)))
    return total / n


def nce_reference(z, y):
    n = len(y)
    pairs = {}
    for a, b in zip(z.tolist(), y.tolist()):
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
    pz = {}
    for (a, _), k in pairs.items():
        pz[a] = pz.get(a, 0) + k
    return sum(k / n * np.log(k / pz[a]) for (a, _), k in pairs.items())


def h_score_reference(f, y):
    """Bao et al.'s formula as in Transfer-Learning-Library (np.cov + a pinv)."""
    covf = np.cov(f, rowvar=False)
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    covg = np.cov(g, rowvar=False)
    return float(np.trace(np.linalg.pinv(covf, hermitian=True) @ covg))


def transrate_reference(f, y, eps=1e-4, weighting="size"):
    """Huang et al.'s R(Z) − Σ_c w_c R(Z_c) with w_c = n_c/N ('size') or 1/C ('uniform'), with the D x D
    determinant of the paper and a loop over the classes."""
    def rate(z):
        n, d = z.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]

    z = f - f.mean(0)
    classes = np.unique(y)
    total = 0.0
    for c in classes:
        weight = (y == c).sum() / len(y) if weighting == "size" else 1.0 / len(classes)
        total += weight * rate(z[y == c])
    return rate(z) - total


def make_data(n=60, d=8, k=3, sep=1.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centers = rng.normal(size=(k, d)) * sep
    return centers[y] + rng.normal(size=(n, d)), y


# -- reference tests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d", [(60, 8), (20, 30)])  # N > D and N < D (zero eigenvalues of FᵀF)
def test_logme_equals_the_authors_iterative_algorithm(n, d):
    f, y = make_data(n, d, k=3, sep=2.0, seed=n)
    assert logme(f, y) == pytest.approx(logme_reference(f, y), rel=1e-6, abs=1e-8)


def test_logme_close_to_the_authors_default_stopping_rule():
    f, y = make_data(80, 6, k=4, seed=3)
    assert logme(f, y) == pytest.approx(logme_reference(f, y, tol=0.01, max_iter=11), abs=1e-2)


# (N, D, class separation): interior maxima (N > D); N < D with two classes at β → ∞ (noise-free
# interpolation) and one inside; weak features, N > D (inside) and N < D (two classes at α → ∞: the evidence
# is highest without the features); separable N < D (all three at β → ∞)
EVIDENCE_CASES = [(60, 8, 2.0), (20, 30, 2.0), (80, 10, 0.2), (40, 60, 0.1), (30, 90, 3.0)]


@pytest.mark.parametrize("n,d,sep", EVIDENCE_CASES)
def test_logme_is_the_maximum_evidence_and_invariant_to_the_features_scale(n, d, sep):
    f, y = make_data(n, d, k=3, sep=sep, seed=n + d)
    score = logme(f, y)
    assert score == pytest.approx(max_evidence_reference(f, y), rel=1e-6)
    for scale in (10.0, 0.01):
        assert logme(scale * f, y) == pytest.approx(score, rel=1e-6)


def test_the_authors_eps_made_logme_depend_on_the_features_scale():
    """Adding 1e-5 to ‖m‖² and ‖y − Fm‖² (the authors' code, tl_jax before issue 33) moves the score of the
    same features x10 by far more than 1e-6; without it the score does not move."""
    f, y = make_data(60, 8, k=3, sep=2.0, seed=0)
    with_eps = [logme_reference(s * f, y, eps=1e-5) for s in (1.0, 10.0)]
    assert abs(with_eps[1] - with_eps[0]) > 1e-3 * abs(with_eps[0])
    assert logme(10 * f, y) == pytest.approx(logme(f, y), rel=1e-9)


def test_leep_and_nce_equal_their_formulas():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 5)) * 2
    theta = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 3, size=40)
    assert leep(theta, y) == pytest.approx(leep_reference(theta, y), rel=1e-10)
    z = theta.argmax(1)
    assert nce(z, y) == pytest.approx(nce_reference(z, y), rel=1e-10, abs=1e-12)


def test_h_score_and_transrate_equal_their_formulas():
    f, y = make_data(50, 6, k=3, seed=2)
    assert h_score(f, y) == pytest.approx(h_score_reference(f, y), rel=1e-8)
    assert transrate(f, y) == pytest.approx(transrate_reference(f, y), rel=1e-8)
    wide, yw = make_data(12, 20, k=3, seed=4)  # N < D: the N x N determinant
    assert transrate(wide, yw) == pytest.approx(transrate_reference(wide, yw), rel=1e-8)


@pytest.mark.parametrize("n,d", [(40, 6), (10, 30)])
def test_transrate_both_weightings_equal_their_formulas_on_unbalanced_classes(n, d):
    f, y = make_data(n, d, k=3, seed=n)
    y = np.where(y == 2, 0, y)
    y[:2] = 2  # class 2 holds exactly 2 examples (issue 33: the weightings were 29 % apart on such a set)
    size, uniform = transrate(f, y), transrate(f, y, weighting="uniform")
    assert size == pytest.approx(transrate_reference(f, y, weighting="size"), rel=1e-8)
    assert uniform == pytest.approx(transrate_reference(f, y, weighting="uniform"), rel=1e-8)
    assert abs(size - uniform) > 0.05 * abs(size)  # the weightings differ when the classes do
    balanced = np.arange(n) % 2
    assert transrate(f, balanced) == pytest.approx(transrate(f, balanced, weighting="uniform"), rel=1e-12)


def test_the_benchmarks_tllib_transcriptions_agree_with_tl_jax():
    """benchmarks/transferability_bench.py times tl_jax against these transcriptions of Transfer-Learning-Library."""
    from benchmarks.transferability_bench import tllib_h_score, tllib_logme, tllib_transrate

    f, y = make_data(90, 12, k=3, sep=1.0, seed=11)
    assert logme(f, y, tol=0.01, max_iter=11) == pytest.approx(tllib_logme(f, y), rel=1e-9)  # TLlib's stopping rule
    assert logme(f, y) == pytest.approx(tllib_logme(f, y), rel=1e-3)
    assert h_score(f, y) == pytest.approx(tllib_h_score(f, y), rel=1e-8)
    assert transrate(f, y, weighting="uniform") == pytest.approx(tllib_transrate(f, y), rel=1e-8)


@pytest.mark.parametrize("n,d", [(50, 6), (12, 30)])
def test_shrinkage_h_score_equals_its_formula(n, d):
    from sklearn.covariance import ledoit_wolf_shrinkage as sk

    f, y = make_data(n, d, k=3, seed=7)
    a = sk(f)
    covf, covg = np.cov(f, rowvar=False), np.cov(np.stack([f[y == c].mean(0) for c in y]), rowvar=False)
    shrunk = (1 - a) * covf + a * np.trace(covf) / d * np.eye(d)
    ref = np.trace(np.linalg.inv(shrunk) @ ((1 - a) * covg))
    assert h_score(f, y, shrinkage="auto") == pytest.approx(ref, rel=1e-8)
    assert h_score(f, y, shrinkage=0.3) < h_score(f, y, shrinkage=0.0) + 1e-12


def test_ledoit_wolf_shrinkage_equals_sklearn():
    from sklearn.covariance import ledoit_wolf_shrinkage as sk

    for n, d in ((30, 5), (10, 40)):
        x = np.random.default_rng(n).normal(size=(n, d)) @ np.diag(np.linspace(0.1, 3, d))
        assert ledoit_wolf_shrinkage(x) == pytest.approx(sk(x), rel=1e-8)


# -- properties ------------------------------------------------------------------------------------------------------
def test_leep_of_a_perfect_source_is_log_one():
    y = np.arange(30) % 5
    assert leep(np.eye(5)[y], y) == pytest.approx(0.0, abs=1e-12)
    permuted = np.eye(5)[(y + 2) % 5]  # a relabelling of the source classes is just as good
    assert leep(permuted, y) == pytest.approx(0.0, abs=1e-12)
    assert leep(np.full((30, 5), 0.2), y) == pytest.approx(np.log(1 / 5))  # uninformative: log prior


def test_nce_of_identical_labels_is_zero_and_of_independent_labels_minus_entropy():
    y = np.arange(40) % 4
    assert nce(y, y) == pytest.approx(0.0, abs=1e-12)
    assert nce(np.zeros(40, int), y) == pytest.approx(-np.log(4))


@pytest.mark.parametrize("score", [logme, h_score, transrate, lambda f, y: h_score(f, y, shrinkage="auto")])
def test_separable_features_score_higher_than_random(score):
    sep, y = make_data(60, 8, k=3, sep=4.0, seed=5)
    rnd = np.random.default_rng(6).normal(size=sep.shape)
    assert score(sep, y) > score(rnd, y)


def test_plain_h_score_saturates_when_n_le_d_and_shrinkage_does_not():
    y = np.arange(20) % 4
    rnd = np.random.default_rng(0).normal(size=(20, 50))
    sep = np.eye(4)[y] @ np.random.default_rng(1).normal(size=(4, 50)) * 3 + rnd
    assert h_score(rnd, y) == pytest.approx(3.0, rel=1e-6)  # C - 1 whatever the features
    assert h_score(sep, y) == pytest.approx(3.0, rel=1e-6)
    assert h_score(sep, y, shrinkage="auto") > h_score(rnd, y, shrinkage="auto")


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,match", [
    (lambda: logme(np.ones((5, 3)), np.zeros(5, int)), "at least 2 classes"),
    (lambda: h_score(np.ones((5, 3)), np.arange(4) % 2), "has 4 entries"),
    (lambda: transrate(np.array([[np.nan, 1.0], [1.0, 2.0]]), np.array([0, 1])), "non-finite"),
    (lambda: logme(np.ones(5), np.arange(5) % 2), "2-D float"),
    (lambda: leep(np.ones((4, 3)), np.arange(4) % 2), "probabilities"),
    (lambda: nce(np.arange(4), np.zeros(4, int)), "at least 2 classes in target_labels"),
    (lambda: h_score(np.ones((4, 3)), np.arange(4) % 2, shrinkage=2), "shrinkage"),
    (lambda: logme(np.ones((4, 3)), np.array([0, 1, -1, 0])), "negative"),
    (lambda: logme(np.zeros((4, 3)), np.arange(4) % 2), "all zero"),
    (lambda: transrate(np.ones((4, 3)), np.arange(4) % 2, weighting="equal"), "weighting"),
])
def test_bad_input_is_one_line(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


# -- end to end: `tl-jax rank` / `tl-jax fewshot` on two tiny runs -----------------------------------------------
TINY = "tests/configs/tiny.py"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tfds_data_dir):
    from tl_jax import config as config_lib
    from tl_jax.train.loop import train

    root = tmp_path_factory.mktemp("rank")
    for name, steps in (("a", 4), ("b", 1)):
        c = config_lib.load_config(f"{TINY}:steps={steps}")
        c.data.data_dir = tfds_data_dir
        c.train.eval_every = 0
        train(c, str(root / name))
    return root


def files_of(root):
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_rank_and_fewshot_cli_end_to_end(two_runs, tfds_data_dir, capsys):
    import json

    import jax

    from tl_jax.cli import main
    from tl_jax.data import build_preprocess, load_split, sample_shots
    from tl_jax.models import get_model
    from tl_jax.train.checkpoint import load_variables

    a, b, out = two_runs / "a", two_runs / "b", two_runs / "out"
    before = files_of(a) | files_of(b)
    target = [f"--target={TINY}", f"--config.data.data_dir={tfds_data_dir}", "--config.data.shots=5"]
    assert main(["rank", *target, "--candidates", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "logme" in printed and str(a) in printed
    rows = json.loads((out / "rank.json").read_text())
    assert sorted(r["candidate"] for r in rows) == [str(a), str(b)] and [r["rank"] for r in rows] == [1, 2]
    assert rows[0]["logme"] >= rows[1]["logme"] and rows[0]["examples"] == 50 and rows[0]["dim"] == 512
    assert (out / "rank.csv").is_file() and (out / "rank.md").read_text().startswith("| rank |")
    # the scores of run a equal the library's on independently extracted features (plain apply, numpy softmax)
    split = load_split("mnist5k", "train", tfds_data_dir)
    idx = sample_shots(split.labels(), 5, 0)
    pp = build_preprocess([{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 14}])
    images = np.stack([pp(split.source[int(i)])["image"] for i in idx])
    labels = split.labels()[idx]
    logits, feats = get_model("cnn", 10).apply(load_variables(str(a)), images, train=False, return_features=True)
    logits, feats = np.asarray(logits, np.float64), np.asarray(feats, np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    row = next(r for r in rows if r["candidate"] == str(a))
    assert row["logme"] == pytest.approx(logme(feats, labels), rel=1e-4)
    assert row["leep"] == pytest.approx(leep(probs / probs.sum(1, keepdims=True), labels), rel=1e-4)
    assert row["nce"] == pytest.approx(nce(logits.argmax(1), labels), rel=1e-6)
    assert row["transrate"] == pytest.approx(transrate(feats, labels), rel=1e-3)
    # a layer by path; a candidate without the named layer: one line naming both, nothing written
    assert main(["rank", *target, "--candidates", str(a), "--layer", "backbone/conv2", "--score", "logme"]) == 0
    assert "backbone/conv2  64" in capsys.readouterr().out  # spatial map averaged: 64 channels
    bad = two_runs / "bad_out"
    assert main(["rank", *target, "--candidates", str(a), "--layer", "backbone/conv9", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (the INFO log lines come before it)
    assert err.startswith("tl-jax rank: error:") and "backbone/conv9" in err and str(a) in err
    assert "backbone/conv2" in err  # its layers are listed
    assert not bad.exists()
    assert main(["rank", *target, "--candidates", str(a), "--score", "logme,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    # few-shot ridge from the CLI; shots larger than a class: one line
    assert main(["fewshot", "--workdir", str(a), *target, "--shots", "1,5", "--seeds", "1"]) == 0
    assert "5-shot: accuracy" in capsys.readouterr().out
    assert main(["fewshot", "--workdir", str(a), *target, "--shots", "100000", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tl-jax fewshot: error:") and "--shots 100000" in err
    assert files_of(a) | files_of(b) == before  # the candidates are never written
    jax.clear_caches()
