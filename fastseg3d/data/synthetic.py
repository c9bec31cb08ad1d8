"""The embedded default dataset: procedural multi-modal 3D volumes with labels, generated on the fly.

No download and no files: case ``i`` of a dataset with seed ``s`` is a pure function of ``(s, i)`` and the
constructor's arguments, so a dataset is reproducible anywhere and costs no disk. Each case has

* a body (a large ellipsoid of soft tissue, label 0) in air;
* a tumour: an irregular (lobulated) region of edema (label 1) around a core (label 2) that is not centred in it;
* thin tubes (label 3): two or three smooth curved vessels of radius 1.5 to 3 voxels crossing the body;
* blobs (label 4): a few small round nodules;

with per-modality contrasts that make each structure visible in some modalities and not others (as FLAIR shows
edema and T1gd the core), a smooth multiplicative bias field, Gaussian noise, and the class imbalance of a real
scan (background is more than 90% of the voxels). ``label_mode="brats_regions"`` gives the three overlapping
BraTS-style regions (TC = core, WT = edema or core, ET = core, nested like a tumour's) as float channels instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["CLASS_NAMES", "SyntheticSegmentation", "generate_case"]

CLASS_NAMES = ("background", "edema", "core", "vessel", "nodule")

# Mean intensity of each class (rows: background tissue, edema, core, vessel, nodule) in each of up to four
# modalities. Each structure differs from tissue in at least two modalities, and edema and core differ from each
# other in two, so every class is separable only by combining channels, as in multi-parametric MRI.
_CONTRAST = torch.tensor([
    [0.50, 0.55, 0.45, 0.50],
    [0.95, 0.55, 0.50, 0.85],
    [0.70, 0.30, 0.95, 0.60],
    [0.50, 0.80, 0.90, 0.20],
    [0.20, 0.90, 0.45, 0.90],
])


def _rand(gen: torch.Generator, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)


def _lobulated_radius(dirs: torch.Tensor, gen: torch.Generator, amplitude: float) -> torch.Tensor:
    """A smooth random radial factor on the unit sphere (sum of a few random plane waves of the direction)."""
    factor = torch.ones(dirs.shape[:-1], dtype=torch.float64)
    for _ in range(4):
        k = torch.nn.functional.normalize(torch.randn(3, generator=gen, dtype=torch.float64), dim=0)
        freq = _rand(gen, 1, low=1.0, high=3.0).item()
        phase = _rand(gen, 1, high=2 * math.pi).item()
        factor = factor + amplitude / 4 * torch.sin(freq * (dirs @ k) * math.pi + phase)
    return factor


def _curve_distance(grid: torch.Tensor, gen: torch.Generator, size: torch.Tensor) -> torch.Tensor:
    """Distance from every voxel to a random smooth curve (a cubic Bezier crossing the volume)."""
    start = _rand(gen, 3, low=0.1, high=0.9) * size
    end = _rand(gen, 3, low=0.1, high=0.9) * size
    axis = int(torch.randint(0, 3, (1,), generator=gen))
    # Pin the ends on opposite faces of one axis so the tube crosses the body.
    start[axis], end[axis] = 0.0, size[axis] - 1
    c1 = _rand(gen, 3, low=0.2, high=0.8) * size
    c2 = _rand(gen, 3, low=0.2, high=0.8) * size
    t = torch.linspace(0, 1, 64, dtype=torch.float64)[:, None]
    pts = ((1 - t) ** 3 * start + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t**2 * c2 + t**3 * end)
    flat = grid.reshape(-1, 3).float()
    return torch.cdist(flat, pts.float()).amin(dim=1).reshape(grid.shape[:-1]).double()


def _smooth_field(shape: Sequence[int], gen: torch.Generator, cells: int = 3) -> torch.Tensor:
    """A smooth random field in [-1, 1]: a coarse random grid upsampled trilinearly."""
    coarse = torch.rand(1, 1, cells, cells, cells, generator=gen, dtype=torch.float64) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]


def _check(spatial_size: Sequence[int], in_channels: int) -> None:
    if len(spatial_size) != 3 or any(int(s) < 16 for s in spatial_size):
        raise ValueError(f"spatial_size must be three sides of at least 16 voxels, got {tuple(spatial_size)}")
    if not 1 <= in_channels <= _CONTRAST.shape[1]:
        raise ValueError(f"in_channels must be 1 to {_CONTRAST.shape[1]}, got {in_channels}")


def generate_case(
    seed: int,
    spatial_size: Sequence[int] = (64, 64, 64),
    in_channels: int = 4,
    noise: float = 0.05,
    bias_field: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic case: ``(image (in_channels, D, H, W) float32, label (D, H, W) int64 in 0..4)``.

    Example:
        >>> image, label = generate_case(0, (32, 32, 32), in_channels=2)
        >>> image.shape, label.shape, int(label.max())
        (torch.Size([2, 32, 32, 32]), torch.Size([32, 32, 32]), 4)
    """
    _check(spatial_size, in_channels)
    gen = torch.Generator().manual_seed(int(seed))
    shape = tuple(int(s) for s in spatial_size)
    size = torch.tensor(shape, dtype=torch.float64)
    axes = [torch.arange(s, dtype=torch.float64) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    scale = size.min().item()

    centre = size / 2 + _rand(gen, 3, low=-0.05, high=0.05) * size
    semi = size * _rand(gen, 3, low=0.40, high=0.47)
    body = (((grid - centre) / semi).square().sum(-1)) <= 1.0
    label = torch.zeros(shape, dtype=torch.int64)

    # Tumour: lobulated edema with an off-centre core, inside the body (offset + largest lobe < body semi-axis).
    t_centre = centre + (_rand(gen, 3, low=-0.12, high=0.12) * size)
    r_edema = scale * _rand(gen, 1, low=0.12, high=0.20).item()
    rel = grid - t_centre
    dist = rel.norm(dim=-1)
    dirs = rel / dist.clamp_min(1e-6)[..., None]
    edema = dist <= r_edema * _lobulated_radius(dirs, gen, amplitude=0.35)
    c_centre = t_centre + _rand(gen, 3, low=-0.2, high=0.2) * r_edema
    rel_c = grid - c_centre
    dist_c = rel_c.norm(dim=-1)
    r_core = r_edema * _rand(gen, 1, low=0.40, high=0.60).item()
    r_core_dir = r_core * _lobulated_radius(rel_c / dist_c.clamp_min(1e-6)[..., None], gen, amplitude=0.3)
    # Edema always wraps the core by at least two voxels, as a real core never touches healthy tissue.
    label[(edema | (dist_c <= r_core_dir + 2.0)) & body] = 1
    label[(dist_c <= r_core_dir) & body] = 2

    # Vessels: drawn before the nodules and never over the tumour, as vessels are displaced by it.
    n_tubes = int(torch.randint(2, 4, (1,), generator=gen))
    for _ in range(n_tubes):
        radius = _rand(gen, 1, low=1.5, high=3.0).item()
        tube = (_curve_distance(grid, gen, size) <= radius) & body & (label == 0)
        label[tube] = 3

    n_blobs = int(torch.randint(2, 6, (1,), generator=gen))
    for _ in range(n_blobs):
        b_centre = centre + _rand(gen, 3, low=-0.6, high=0.6) * semi
        radius = scale * _rand(gen, 1, low=0.035, high=0.07).item()
        blob = ((grid - b_centre).norm(dim=-1) <= radius) & body & (label == 0)
        label[blob] = 4

    # Intensities: class means with per-case jitter, a texture inside the tissue, bias field and noise.
    contrast = _CONTRAST[:, :in_channels].double() + _rand(gen, *_CONTRAST[:, :in_channels].shape, low=-0.04,
                                                            high=0.04)
    image = contrast[label].permute(3, 0, 1, 2).clone()
    image[:, ~body] = 0.0
    for c in range(in_channels):
        image[c] += 0.05 * _smooth_field(shape, gen, cells=6) * body
        image[c] *= 1.0 + bias_field * _smooth_field(shape, gen)
    image += noise * torch.randn(image.shape, generator=gen, dtype=torch.float64)
    return image.float(), label


def brats_regions(label: torch.Tensor) -> torch.Tensor:
    """Nested BraTS-style regions of a synthetic label: channels (TC, WT, ET) = (core, edema | core, core)."""
    core = label == 2
    return torch.stack([core, (label == 1) | core, core]).float()


class SyntheticSegmentation(torch.utils.data.Dataset):
    """The embedded default dataset: ``num_cases`` procedural cases (see the module docstring).

    Items are dictionaries as MONAI's dictionary transforms produce them: ``"image"`` (C, D, H, W) float32,
    ``"label"`` (1, D, H, W) int64 (``label_mode="labels"``, classes :data:`CLASS_NAMES`) or (3, D, H, W) float32
    (``label_mode="brats_regions"``), and ``"name"``. Case ``i`` depends only on ``(seed, i)``; a training set and
    a validation set with different seeds share no case. ``augment=True`` adds random flips (drawn from a
    generator seeded by the case and ``epoch``, which the trainer sets with :meth:`set_epoch`, so augmentation is
    reproducible too). ``cache=True`` keeps each generated case in memory (about 6.3 MB per 64^3 case with four
    modalities: a 4.2 MB image and a 2.1 MB int64 label), which pays when generation (about 0.2 s per 64^3 case)
    would otherwise dominate a small model's step.

    Example:
        >>> ds = SyntheticSegmentation(num_cases=2, spatial_size=(32, 32, 32), in_channels=4)
        >>> item = ds[1]
        >>> item["image"].shape, item["label"].shape, item["name"]
        (torch.Size([4, 32, 32, 32]), torch.Size([1, 32, 32, 32]), 'synthetic_0_0001')
        >>> ds.num_classes
        5
    """

    def __init__(
        self,
        num_cases: int,
        spatial_size: Sequence[int] = (64, 64, 64),
        in_channels: int = 4,
        seed: int = 0,
        label_mode: str = "labels",
        augment: bool = False,
        noise: float = 0.05,
        bias_field: float = 0.15,
        cache: bool = False,
    ) -> None:
        if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases <= 0:
            raise ValueError(f"num_cases must be a positive int, got {num_cases!r}")
        if label_mode not in ("labels", "brats_regions"):
            raise ValueError(f"label_mode must be 'labels' or 'brats_regions', got {label_mode!r}")
        self.num_cases = num_cases
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.in_channels = in_channels
        self.seed = int(seed)
        self.label_mode = label_mode
        self.augment = augment
        self.noise = noise
        self.bias_field = bias_field
        self.epoch = 0
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None
        _check(self.spatial_size, in_channels)  # now, not in a DataLoader worker

    @property
    def num_classes(self) -> int:
        """Output channels a network needs: 5 labels, or 3 regions."""
        return len(CLASS_NAMES) if self.label_mode == "labels" else 3

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_cases

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_cases:
            raise IndexError(f"case {index} out of range for {self.num_cases} cases")
        # Mix seed and index so that nearby (seed, index) pairs give unrelated cases.
        case_seed = (self.seed * 1_000_003 + index * 7919 + 17) % (2**63)
        if self._cache is not None and index in self._cache:
            image, label = self._cache[index]
        else:
            image, label = generate_case(case_seed, self.spatial_size, self.in_channels, self.noise, self.bias_field)
            if self._cache is not None:
                self._cache[index] = (image, label)
        if self.augment:
            gen = torch.Generator().manual_seed(case_seed + 104_729 * (self.epoch + 1))
            flips = [d + 1 for d in range(3) if torch.rand(1, generator=gen).item() < 0.5]
            if flips:
                image = image.flip(flips)
                label = label.flip([d - 1 for d in flips])
        target = label[None] if self.label_mode == "labels" else brats_regions(label)
        return {"image": image, "label": target, "name": f"synthetic_{self.seed}_{index:04d}"}
