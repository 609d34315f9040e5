"""The rate-distortion curve of a sweep: a PNG (matplotlib, Agg) and a table.

Rate is the KL term in bits per image, distortion the reconstruction term in bits per image,
both on held-out data; the VAE objective is distortion + beta * rate (lecture, "Soft EM is to
Hard EM as VAE is to Rate-Distortion": the lambda there weighs distortion against rate, so
beta plays 1/lambda). The ELBO-optimal point minimises rate + distortion, the -ELBO at beta=1.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.sweep.results import PointResult, best

__all__ = ["COLUMNS", "csv", "draw", "table"]

COLUMNS = (
    "name",
    "kl_weight",
    "latent_dim",
    "rate_bits",
    "distortion_bits",
    "neg_elbo_bits",
    "bits_per_dim",
    "status",
    "run_id",
)


def table(results: list[PointResult]) -> dict[str, list]:
    """``{"columns": COLUMNS, "data": rows}`` (MLflow's table JSON), one row per point, by
    latent size and then falling rate (rising KL weight)."""
    rows = sorted(results, key=lambda r: (r.latent_dim, -r.rate_bits))
    return {"columns": list(COLUMNS), "data": [[getattr(r, c) for c in COLUMNS] for r in rows]}


def csv(results: list[PointResult]) -> str:
    """:func:`table` as CSV text."""
    t = table(results)
    return "\n".join(",".join(str(v) for v in row) for row in [t["columns"], *t["data"]]) + "\n"


def draw(results: list[PointResult], path: str | Path, title: str = "") -> None:
    """Distortion against rate, one marker per point labelled with its KL weight, one line per
    latent size, the ELBO-optimal point starred with its iso-ELBO line (rate + distortion =
    its -ELBO)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()
    for dim in sorted({r.latent_dim for r in results}):
        rows = sorted((r for r in results if r.latent_dim == dim), key=lambda r: r.rate_bits)
        ax.plot(
            [r.rate_bits for r in rows],
            [r.distortion_bits for r in rows],
            "o-",
            label=f"latent {dim}",
        )
        for r in rows:
            mark = "" if r.status == "finished" else f" ({r.status})"
            ax.annotate(
                f"β={r.kl_weight:g}{mark}",
                (r.rate_bits, r.distortion_bits),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=8,
            )
    top = best(results)
    if top is not None:
        elbo = top.neg_elbo_bits
        ax.plot(
            [top.rate_bits],
            [top.distortion_bits],
            "*",
            markersize=16,
            color="crimson",
            label=f"ELBO-optimal: β={top.kl_weight:g}, -ELBO {elbo:.1f} bits",
        )
        xlim, ylim = ax.get_xlim(), ax.get_ylim()
        ax.plot(xlim, [elbo - x for x in xlim], ":", color="crimson", linewidth=1)
        ax.set_xlim(xlim), ax.set_ylim(ylim)  # the line, clipped to the points' view
    ax.set_xlabel("rate: KL(q(z|x) || p(z)), bits per image (held-out)")
    ax.set_ylabel("distortion: -log p(x|z), bits per image")
    ax.set_title(title or "rate-distortion")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))
