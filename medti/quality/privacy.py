"""Is a synthetic image a near-copy of a training patient? The weight-free method behind `python -m medti.audit`.

What must be caught: a training image reproduced as it is, or with mild noise, a brightness/contrast change, a
small shift (a few percent of the width), a mirror, a JPEG re-encode. What must not be caught: another patient of
the same modality, who shares the whole look (body outline, lung fields, ribs and spine at about the same place).
The second is the hard part: every chest X-ray correlates with every other one, so a plain pixel distance either
misses the changed copies or flags the whole set. So the method compares what is left after removing what all
patients share, weighs each spatial frequency by how much patients differ there, and lets the copy move and
mirror:

1. Descriptor (`descriptors`): luma, resized to SIZE x SIZE (antialiased; any input size or aspect), zero mean and
   unit norm: a brightness/contrast change a * x + b cancels exactly.
2. Whitening (`fit`): every descriptor is filtered by 1 / sqrt(P(f) + REGULARIZE * mean P), where P(f) is the
   power at spatial frequency f of the training descriptors minus their mean (and of their mirrors, so the filter
   is mirror-symmetric). Frequencies at which all patients look alike (the smooth anatomy, the rib spacing) are
   damped; those at which patients differ (texture, lesions, the exact borders) count. The regulariser keeps
   frequencies where patients hardly vary from being amplified without bound.
3. Score (`ncc`): normalised cross-correlation between the central crop of the synthetic image (MARGIN px cut from
   every side) and every same-sized window of a training image, i.e. every shift of up to MARGIN px each way
   (MARGIN / SIZE = 6.25 % of the width), for the image and its mirror, each moved by every quarter-pixel phase
   (`variants`: whitened detail is sharp, so a copy half a pixel off loses a third of its score). At each shift
   the training set's mean (the template) is subtracted from both sides at the training window's place: the
   template moves with the patient, so a shifted copy still matches, while what two patients share is removed
   before they are compared. Each window is normalised on its own, so the border a shift brings in never enters
   the score. The similarity is the best NCC, clipped to [0, 1]: 1 = the same pixels up to the changes above.
4. Prefilter (`candidates`): the exact search (FFT at SIZE, `exact`) runs on CANDIDATES training images per
   synthetic one, chosen by the same score at half size (whitened there by a filter fitted there, half-pixel
   phases) for all pairs, as one matrix product per shift, so 2,000 x 1,000 images take seconds once decoded.

THRESHOLD (flag: similarity >= THRESHOLD) was chosen on the simulated chest X-ray modality of tests/test_privacy.py
(its docstring has the table): 800 planted copies (100 for each change above, one more with all at once) scored
0.928 and up; 700 non-copies (500 other patients, 100 images with a training patient's exact anatomy but other
detail, 100 with its low frequencies but other detail) 0.871 and below. 0.9 is the middle of the gap: detection
800 of 800, false positives 0 of 700 (MEASURED). The tests check it on another population of the same modality.
Nothing here is random: the same images give the same scores.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIZE = 64          # descriptor side: enough for texture and borders, small enough that all pairs stay cheap
MARGIN = 4         # largest shift searched, in descriptor pixels each way (6.25 % of the width)
REGULARIZE = 0.1   # whitening floor, as a fraction of the mean power: see the module docstring, step 2
CANDIDATES = 8     # training images per synthetic image that get the exact search
THRESHOLD = 0.9    # flag at similarity >= this; chosen from the measured distributions (module docstring)
CHUNK = 256        # synthetic images per step: ~10 MB of scores per 1,000 training images
PHASES = tuple((dy / 4, dx / 4) for dy in range(4) for dx in range(4))   # sub-pixel offsets tried
COARSE_PHASES = ((0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5))
# What `python tests/test_privacy.py` measured at THRESHOLD on the simulated chest X-ray modality (300 training
# patients, 256 x 256): 100 planted copies per change (identical, noise std 8/255, brightness/contrast 0.8 x + 30,
# gamma 0.8, shift 2 % up and 5 % right, mirror, JPEG quality 75, all of them at once) against 500 other patients,
# 100 images with a training patient's exact anatomy but other detail and 100 with its low frequencies.
MEASURED = {"copies": 800, "copies_flagged": 800, "lowest_copy": 0.928, "others": 700, "others_flagged": 0,
            "highest_other": 0.871}
LUMA = torch.tensor([0.299, 0.587, 0.114])   # ITU-R 601 weights, as PIL's convert("L")


@dataclass
class Match:
    """The nearest training image of each synthetic image and how it matches (rows follow the synthetic list)."""
    index: torch.Tensor        # [M] long: row of the nearest training image
    similarity: torch.Tensor   # [M] float in [0, 1]
    mirrored: torch.Tensor     # [M] bool: the best match was the synthetic image's mirror
    shift: torch.Tensor        # [M, 2] float (dy, dx): descriptor px the synthetic content sits below/right


@dataclass
class Reference:
    """What the training set contributes, computed once (`fit`): the filter, the whitened images and the mean."""
    gain: torch.Tensor       # [SIZE, SIZE // 2 + 1] whitening gain per rfft2 frequency
    images: torch.Tensor     # [N, SIZE, SIZE] whitened training descriptors
    template: torch.Tensor   # [SIZE, SIZE] their mean
    coarse: "Reference | None" = None   # the same at half size, fitted there, for the prefilter


@dataclass
class Sums:
    """One side of an NCC at every shift d ([..., D], D = (2 * margin + 1) ** 2): over the compared window, the sum
    of the image, of its square, and of its product with the template's window at that shift."""
    total: torch.Tensor
    square: torch.Tensor
    with_template: torch.Tensor


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Each [..., H, W] image to zero mean and unit L2 norm (a flat image stays all zero instead of NaN)."""
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return x / x.square().sum(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-12)


def descriptors(images: list) -> torch.Tensor:
    """uint8 [3, H, W] images of any sizes -> [N, SIZE, SIZE] float32 luma, standardised."""
    small = []
    for image in images:
        luma = torch.einsum("c,chw->hw", LUMA, image.float())[None, None]
        small.append(F.interpolate(luma, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False))
    return standardize(torch.cat(small)[:, 0])


def whiten(desc: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    return standardize(torch.fft.irfft2(torch.fft.rfft2(desc) * gain, s=desc.shape[-2:]))


def halve(images: torch.Tensor) -> torch.Tensor:
    """[N, S, S] -> [N, S / 2, S / 2]: the mean of each 2 x 2 block."""
    return F.avg_pool2d(images[:, None], 2)[:, 0]


def fit(train_desc: torch.Tensor, coarse: bool = True) -> Reference:
    """The whitening filter from how the training patients differ (N >= 2), and the whitened set with its mean;
    coarse: the same fitted again on the half-size descriptors. Why a filter of its own there: whitening puts the
    weight on fine detail, which halving removes, so the fine filter's output halved keeps mostly what all patients
    share and ranks a copy's source poorly."""
    spread = train_desc - train_desc.mean(0)
    power = (torch.fft.rfft2(spread).abs().square() + torch.fft.rfft2(spread.flip(-1)).abs().square()).mean(0)
    gain = (power + REGULARIZE * power.mean()).rsqrt()
    images = whiten(train_desc, gain)
    return Reference(gain, images, images.mean(0), fit(halve(train_desc), False) if coarse else None)


def box(x: torch.Tensor, side: int) -> torch.Tensor:
    """[..., H, W] -> [..., D]: the sum over every side x side window, row-major over window offsets (integral
    images in float64: the differences of large running sums lose no digits)."""
    c = F.pad(x.double().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    sums = c[..., side:, side:] - c[..., :-side, side:] - c[..., side:, :-side] + c[..., :-side, :-side]
    return sums.flatten(-2)


def inverse_dft(size: int, margin: int) -> tuple:
    """The two matrices that evaluate an inverse rfft2 of a [size, size // 2 + 1] spectrum at the offsets
    [0, 2 * margin]^2 only: rows (fy -> dy) and columns (fx -> dx), the latter with weight 2 for the bins whose
    mirror image rfft leaves out. Why not irfft2: it computes size^2 outputs to use (2 * margin + 1)^2."""
    offsets = torch.arange(2 * margin + 1, dtype=torch.float64)
    rows = torch.exp(2j * torch.pi * torch.fft.fftfreq(size, dtype=torch.float64)[:, None] * offsets)
    weight = torch.full((size // 2 + 1, 1), 2.0, dtype=torch.float64)
    weight[0], weight[-1] = 1.0, 1.0   # DC and Nyquist columns stand for themselves
    columns = weight * torch.exp(2j * torch.pi * torch.fft.rfftfreq(size, dtype=torch.float64)[:, None] * offsets)
    return rows.to(torch.complex64) / size ** 2, columns.to(torch.complex64)


def xcorr(crop_spectra: torch.Tensor, spectra: torch.Tensor, margin: int) -> torch.Tensor:
    """sum_q crop[q] * image[q + d] for every offset d in [0, 2 * margin]^2, flattened to [..., D]. The crop sits
    at the origin of an image-sized grid, so no offset wraps around in the circular FFT correlation."""
    rows, columns = inverse_dft(spectra.shape[-2], margin)
    product = crop_spectra.conj() * spectra                                       # [..., size, size // 2 + 1]
    corr = (rows.T @ product @ columns).real                                      # [..., 2m + 1, 2m + 1]
    return corr.flatten(-2).double()


def crop_sums(images: torch.Tensor, template: torch.Tensor, margin: int) -> tuple:
    """The synthetic side: (its central crops' rfft2 on the full grid, their Sums against each template window)."""
    size = images.shape[-1]
    crops = images[..., margin:size - margin, margin:size - margin]
    spectra = torch.fft.rfft2(F.pad(crops, (0, 2 * margin, 0, 2 * margin)))
    with_template = xcorr(spectra, torch.fft.rfft2(template), margin)
    return spectra, Sums(crops.sum((-2, -1), dtype=torch.float64)[..., None],
                                crops.square().sum((-2, -1), dtype=torch.float64)[..., None], with_template)


def window_sums(images: torch.Tensor, template: torch.Tensor, side: int) -> Sums:
    """The training side: the window moves, and the template window moves with it."""
    return Sums(box(images, side), box(images.square(), side), box(images * template, side))


def ncc(cross: torch.Tensor, a: Sums, b: Sums, t: Sums, n: int) -> torch.Tensor:
    """Correlation of u = crop - template window and v = training window - template window at every shift, from
    sums: cross = sum crop * training window, t = the template window's own sums, n = pixels per window. A side
    with (almost) nothing left after the template is removed, or a flat image, has nothing to match: score 0."""
    su, sv = a.total - t.total, b.total - t.total
    suu = a.square - 2 * a.with_template + t.square
    svv = b.square - 2 * b.with_template + t.square
    cov = cross - a.with_template - b.with_template + t.square - su * sv / n
    var_u, var_v = suu - su * su / n, svv - sv * sv / n
    own_u, own_v = a.square - a.total ** 2 / n, b.square - b.total ** 2 / n   # variance before template removal
    usable = (var_u > 1e-3 * own_u) & (var_v > 1e-3 * own_v) & (own_u > 1e-9) & (own_v > 1e-9)
    return torch.where(usable, cov / (var_u * var_v).clamp_min(1e-30).sqrt(), 0.0)


def fourier_shift(images: torch.Tensor, dy: float, dx: float) -> torch.Tensor:
    """[..., S, S] moved down/right by a fraction of a pixel (band-limited interpolation: a phase ramp)."""
    size = images.shape[-1]
    ramp = torch.fft.fftfreq(size)[:, None] * dy + torch.fft.rfftfreq(size)[None] * dx
    return torch.fft.irfft2(torch.fft.rfft2(images) * torch.exp(-2j * torch.pi * ramp), s=images.shape[-2:])


def variants(images: torch.Tensor, phases) -> list:
    """Each whitened synthetic descriptor as it is and mirrored, each at every sub-pixel phase of PHASES; entry
    v = mirrored * len(PHASES) + phase. Why phases: whitened descriptors are sharp, so half a pixel of misalignment
    costs a copy up to a third of its score, and a real shift is rarely a whole number of descriptor pixels."""
    return [fourier_shift(x, dy, dx) for x in (images, images.flip(-1)) for dy, dx in phases]


def residual_windows(windows: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """[..., h, w] windows minus the template's window, centred, unit norm, flattened. A window with (almost)
    nothing left after the template is removed, or a flat one, becomes zero: it has nothing to match."""
    own = windows - windows.mean((-2, -1), keepdim=True)
    left = windows - template
    left = left - left.mean((-2, -1), keepdim=True)
    energy, own_energy = left.square().sum((-2, -1)), own.square().sum((-2, -1))
    usable = (energy > 1e-3 * own_energy) & (own_energy > 1e-9)
    return (left / energy.clamp_min(1e-30).sqrt()[..., None, None] * usable[..., None, None]).flatten(-2)


def candidates(syn: list, coarse: Reference, k: int, groups: torch.Tensor | None) -> torch.Tensor:
    """[M, k] training rows with the best NCC at half size over every coarse shift and every variant (all pairs:
    one matrix product per shift). syn: variants() of the half-size descriptors whitened by coarse.gain.
    groups: synthetic row i is training row i, and no row of its group (groups[i]) may be a candidate."""
    margin, images, template = MARGIN // 2, coarse.images, coarse.template
    side = images.shape[-1] - 2 * margin
    windows = [(..., slice(dy, dy + side), slice(dx, dx + side))
               for dy in range(2 * margin + 1) for dx in range(2 * margin + 1)]
    train = [residual_windows(images[w], template[w]) for w in windows]                       # D x [N, side²]
    found = []
    for start in range(0, len(syn[0]), CHUNK):
        crops = torch.stack([v[start:start + CHUNK, margin:margin + side, margin:margin + side] for v in syn])
        best = torch.full(crops.shape[1:2] + (len(images),), -2.0)
        for w, t in zip(windows, train, strict=True):
            u = residual_windows(crops, template[w])                                           # [V, m, side²]
            best = torch.maximum(best, (u.flatten(0, 1) @ t.T).view(*u.shape[:2], -1).amax(0))
        if groups is not None:
            best[groups[start:start + CHUNK, None] == groups[None]] = -2.0   # below any NCC
        found.append(best.topk(k, dim=1).indices)
    return torch.cat(found)


def exact(syn: list, ref: Reference, rows: torch.Tensor) -> Match:
    """The NCC at every shift (FFT at SIZE) of every variant against the candidate training rows [M, k]."""
    side = SIZE - 2 * MARGIN
    spectra = torch.fft.rfft2(ref.images)
    b, t = window_sums(ref.images, ref.template, side), window_sums(ref.template, ref.template, side)
    best = torch.full(rows.shape[:1], -2.0, dtype=torch.float64)
    where = torch.zeros(len(best), 2, dtype=torch.long)   # (candidate column * D + shift, variant)
    for start in range(0, len(best), CHUNK):
        cand, part = rows[start:start + CHUNK], slice(start, start + CHUNK)
        train = Sums(b.total[cand], b.square[cand], b.with_template[cand])                 # [m, k, D]
        train_spectra = spectra[cand]
        for variant, images in enumerate(syn):
            crop_spectra, a = crop_sums(images[part], ref.template, MARGIN)
            cross = xcorr(crop_spectra[:, None], train_spectra, MARGIN)                     # [m, k, D]
            a = Sums(a.total[:, None], a.square[:, None], a.with_template[:, None])
            score, flat = ncc(cross, a, train, t, side * side).flatten(1).max(dim=1)
            better = score > best[part]
            best[part] = torch.where(better, score, best[part])
            where[part] = torch.where(better[:, None], torch.stack([flat, torch.full_like(flat, variant)], 1),
                                      where[part])
    return match(rows, best, where)


def match(rows: torch.Tensor, best: torch.Tensor, where: torch.Tensor) -> Match:
    """Match from the best (candidate * D + shift, variant) of each synthetic image."""
    shifts = 2 * MARGIN + 1
    index = rows.gather(1, where[:, :1] // shifts ** 2)[:, 0]
    offset = where[:, 0] % shifts ** 2
    phase = torch.tensor(PHASES)[where[:, 1] % len(PHASES)]
    # The crop of the variant moved by `phase` sits at window offset d of the training image, so the synthetic
    # content moved by MARGIN - d - phase relative to it.
    shift = MARGIN - torch.stack([offset // shifts, offset % shifts], 1) - phase
    return Match(index, best.float().clamp(0, 1), where[:, 1] >= len(PHASES), shift)


def nearest(ref: Reference, syn_desc: torch.Tensor, exclude_self: bool = False,
            groups: torch.Tensor | None = None) -> Match:
    """The nearest training image of every synthetic one ([M, SIZE, SIZE] descriptors). groups: syn_desc are the
    training descriptors themselves, groups [N] their patients (any integer labels), and an image may match no
    image of its own patient: how alike *different* patients are. Why not only itself: a volume's adjacent slices
    or two views of one chest are near-copies of each other, and would make the baseline look like copying.
    exclude_self: the same with every image its own patient. The gains are mirror-symmetric, so mirroring after
    whitening equals whitening the mirror."""
    if exclude_self and groups is None:
        groups = torch.arange(len(syn_desc))
    largest = 0 if groups is None else int(torch.unique(groups, return_counts=True)[1].max())
    if len(ref.images) - largest < 1:
        raise ValueError("every training image is of one patient: there is no other patient to compare with")
    fine, coarse = whiten(syn_desc, ref.gain), whiten(halve(syn_desc), ref.coarse.gain)
    k = min(CANDIDATES, len(ref.images) - largest)   # every row keeps at least k candidates of other patients
    rows = candidates(variants(coarse, COARSE_PHASES), ref.coarse, k, groups)
    return exact(variants(fine, PHASES), ref, rows)


def feature_nearest(syn: torch.Tensor, mirrored: torch.Tensor, train: torch.Tensor) -> tuple:
    """The second opinion (`--features dinov2`): (nearest training row [M], cosine similarity [M]) of network
    features [M, d] of the synthetic images and of their mirrors against the training features [N, d]. Reported
    beside the score above, never flagged on: no feature threshold has been measured here."""
    train = F.normalize(train, dim=1)
    cosine = torch.maximum(F.normalize(syn, dim=1) @ train.T, F.normalize(mirrored, dim=1) @ train.T)
    best, index = cosine.max(dim=1)
    return index, best
