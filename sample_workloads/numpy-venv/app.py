"""numpy-venv: deterministic linear algebra through numpy's vendored OpenBLAS.

    .venv/bin/python app.py

`import numpy` loads numpy/_core/_multiarray_umath*.so, whose DT_RPATH
($ORIGIN/../../numpy.libs) is what lets the dynamic loader find the vendored
libscipy_openblas64_*.so and, through it, libgfortran/libquadmath. Results
are printed with few decimals so that they do not depend on which OpenBLAS
kernel (OPENBLAS_CORETYPE) or how many threads were used.
"""

import numpy as np


def fmt(values) -> str:
    """Fixed-precision formatting that never prints '-0.0000'."""
    arr = np.asarray(values, dtype=float)
    arr = np.where(np.abs(arr) < 5e-5, 0.0, arr)
    return np.array2string(arr, precision=4, floatmode="fixed", suppress_small=True, separator=", ")


def main() -> None:
    a = np.array([[4.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 4.0]])
    b = np.array([11.0, -16.0, 17.0])

    x = np.linalg.solve(a, b)
    print("solve A x = b:", fmt(x))
    print("residual small:", bool(np.allclose(a @ x, b)))
    print("det(A):", f"{np.linalg.det(a):.4f}")
    print("eigvalsh(A):", fmt(np.linalg.eigvalsh(a)))
    print("inv(A) @ A == I:", bool(np.allclose(np.linalg.inv(a) @ a, np.eye(3))))

    # A larger product goes through OpenBLAS's dgemm (threaded kernels).
    n = 200
    m = np.arange(n * n, dtype=float).reshape(n, n) % 7 - 3.0
    p = m @ m.T
    print(f"trace(M M^T) for {n}x{n}:", f"{np.trace(p):.1f}")
    print("sum(M M^T):", f"{p.sum():.1f}")
    print("symmetric:", bool(np.array_equal(p, p.T)))

    q, r = np.linalg.qr(a)
    print("|diag(R)| from QR:", fmt(np.abs(np.diag(r))))
    s = np.linalg.svd(a, compute_uv=False)
    print("singular values:", fmt(s))
    tall_a, tall_b = np.vstack([a, a]), np.concatenate([b, b])
    print("lstsq on overdetermined system:", fmt(np.linalg.lstsq(tall_a, tall_b, rcond=None)[0]))

    rng = np.random.default_rng(seed=1234)
    sample = rng.integers(0, 100, size=1000)
    print("seeded rng: mean", f"{sample.mean():.3f}", "median", f"{np.median(sample):.1f}")
    spectrum = np.abs(np.fft.rfft(np.sin(np.linspace(0, 8 * np.pi, 64, endpoint=False))))
    print("fft peak bin:", int(np.argmax(spectrum)))


if __name__ == "__main__":
    main()
