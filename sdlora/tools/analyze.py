"""`sdlora analyze`: the LoRA paper's Section 7 for your own adapters.

Per module: the singular values of the update ΔW and its effective rank (the smallest rank keeping 90% and 99% of
the squared Frobenius norm). With two adapters of the same data (say rank 8 and rank 32): the normalised subspace
similarity of their top directions, phi(i, j) = ||V1_i^T V2_j||_F^2 / min(i, j), where V_i holds the top i right
singular vectors of a module's ΔW (its input directions; for ΔW = BA they span A's rows, the matrices the paper
compares). phi is 1 when one subspace contains the other and about i·j/n for random ones.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..convert import reference
from ..errors import FormatError
from ..lorafile import read_lora
from .updates import read_updates

ENERGIES = (0.9, 0.99)


@dataclass
class ModuleSpectrum:
    name: str
    rank: int  # the file's rank (0 for LoHa/LoKr)
    singular_values: list[float]
    effective: dict[str, int]  # "90%" / "99%" -> rank
    directions: torch.Tensor = field(repr=False)  # top right singular vectors, (k, in)


def effective_rank(s: torch.Tensor, energy: float) -> int:
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 0
    return int((torch.cumsum(power, 0) / total < energy - 1e-12).sum()) + 1


def spectra(path: Path, base: str | None = None) -> tuple[str, list[ModuleSpectrum]]:
    lf = read_lora(path)
    models, family, ref_name = reference(lf, base)
    _, updates = read_updates(path, models, family, ref_name)
    out = []
    for u in updates:
        delta = u.delta().flatten(1)
        _, s, vh = torch.linalg.svd(delta, full_matrices=False)
        keep = u.rank or int((s > s[0] * 1e-6).sum()) if s.numel() else 0
        s = s[: max(keep, 1)]
        out.append(ModuleSpectrum(f"{u.component}.{u.path}", u.rank, [round(float(x), 6) for x in s],
                                  {f"{e:.0%}": effective_rank(s, e) for e in ENERGIES}, vh[: max(keep, 1)]))
    return family, out


def phi(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """phi[i-1, j-1] = ||V1[:i] V2[:j]^T||_F^2 / min(i, j) for i <= rows of v1, j <= rows of v2."""
    overlap = (v1.double() @ v2.double().T) ** 2  # (r1, r2): squared cosines between directions
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, v1.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, v2.shape[0] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def analyze(paths: list[Path], base: str | None = None) -> dict:
    if not 1 <= len(paths) <= 2:
        raise FormatError("analyze takes one LoRA, or two trained on the same data to compare")
    report: dict = {"files": []}
    results = []
    for path in paths:
        family, mods = spectra(path, base)
        results.append(mods)
        report["files"].append({
            "file": Path(path).name, "family": family, "modules": len(mods),
            "median_effective_rank": {e: statistics.median(m.effective[e] for m in mods) for e in mods[0].effective},
            "rank": max(m.rank for m in mods),
            "per_module": [{"module": m.name, "rank": m.rank, "effective_rank": m.effective,
                            "singular_values": m.singular_values} for m in mods],
        })
    if len(results) == 2:
        second = {m.name: m for m in results[1]}
        pairs = [(m, second[m.name]) for m in results[0] if m.name in second]
        if not pairs:
            raise FormatError(f"{paths[0]} and {paths[1]} share no module; they cannot be compared")
        maps = [phi(a.directions, b.directions) for a, b in pairs]
        r1, r2 = min(m.shape[0] for m in maps), min(m.shape[1] for m in maps)
        mean = torch.stack([m[:r1, :r2] for m in maps]).mean(0)
        report["similarity"] = {
            "modules": len(pairs), "phi_mean": [[round(float(x), 4) for x in row] for row in mean],
            "phi_diagonal": [round(float(mean[k, k]), 4) for k in range(min(r1, r2))],
            "per_module_phi_1_1": {a.name: round(float(m[0, 0]), 4) for (a, _), m in zip(pairs, maps, strict=True)},
        }
    report["summary"] = summary(report)
    return report


def summary(report: dict) -> str:
    lines = []
    for f in report["files"]:
        eff = f["median_effective_rank"]
        lines.append(f"{f['file']}: rank {f['rank']}, {f['modules']} modules; the median module keeps 90% of its update "
                     f"in {eff['90%']:g} directions and 99% in {eff['99%']:g}")
    if "similarity" in report:
        d = report["similarity"]["phi_diagonal"]
        lines.append(f"subspace similarity of the two (mean over {report['similarity']['modules']} modules): "
                     f"phi(1,1) = {d[0]:.2f}" + (f", phi({len(d)},{len(d)}) = {d[-1]:.2f}" if len(d) > 1 else ""))
    return "\n".join(lines)


def plot(report: dict, folder: Path) -> list[Path]:
    """PNG spectra (normalised singular values of every module, one line each) and, for two files, the phi map."""
    from PIL import Image, ImageDraw

    from ..safefiles import atomic_save_image

    folder = Path(folder)
    out = []
    for f in report["files"]:
        img = Image.new("RGB", (480, 320), "white")
        d = ImageDraw.Draw(img)
        longest = max(len(m["singular_values"]) for m in f["per_module"])
        for m in f["per_module"]:
            s = m["singular_values"]
            if not s or s[0] == 0:
                continue
            pts = [(40 + 420 * k / max(1, longest - 1), 290 - 260 * v / s[0]) for k, v in enumerate(s)]
            d.line(pts, fill=(70, 110, 200), width=1)
        d.text((40, 6), f"{f['file']}: normalised singular values per module", fill="black")
        d.text((40, 298), f"1 ... {longest} (direction)", fill="black")
        path = folder / f"{Path(f['file']).stem}-spectra.png"
        atomic_save_image(img, path)
        out.append(path)
    if "similarity" in report:
        grid = report["similarity"]["phi_mean"]
        cell = max(4, min(24, 400 // max(len(grid), len(grid[0]))))
        img = Image.new("RGB", (60 + cell * len(grid[0]), 40 + cell * len(grid)), "white")
        d = ImageDraw.Draw(img)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                shade = int(255 * (1 - v))
                d.rectangle([60 + j * cell, 30 + i * cell, 60 + (j + 1) * cell - 1, 30 + (i + 1) * cell - 1],
                            fill=(shade, shade, 255))
        d.text((4, 6), f"phi(i, j): rows {report['files'][0]['file']}, columns {report['files'][1]['file']}",
               fill="black")
        path = folder / "phi.png"
        atomic_save_image(img, path)
        out.append(path)
    return out
