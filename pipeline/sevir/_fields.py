"""Radar-like VIL fields for the synthetic SEVIR sample (used by :mod:`pipeline.sevir.synthetic`).

One event is a few storm *systems* (wide, weak stratiform envelopes) carrying
short-lived convective *cores* (small, intense generalized-Gaussian blobs). Every
blob moves with a smooth flow, a steering wind that slowly turns and changes speed, plus
a divergence-free perturbation from a few drifting stream-function modes, and its
intensity follows a grow-mature-decay lifecycle. Contributions are summed in
physical units (kg/m^2), so cells that overlap merge into one brighter cell; new
cores are often born next to an existing one. The sum is multiplied by log-normal
power-law noise (a texture on all scales) that is advected semi-Lagrangianly by the
same flow and slowly decorrelates, then encoded to SEVIR's 0-255 scale.

Persistence is therefore a poor forecast (everything moves), and extrapolating the
motion is better but imperfect (cells grow, decay, merge, turn, and parts of the
field move at different speeds).

Units: lengths in pixels (1 km), time in frames (5 min), velocities in pixels per
frame (1 px/frame = 3.3 m/s), intensities in kg/m^2 until :func:`kgm2_to_vil`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# A blob is drawn out to where it falls below this many kg/m^2 (about 0 on the 0-255 scale).
_NEGLIGIBLE_KGM2 = 0.003
# Fields are built at 128 px; counts of systems scale with the frame's area.
_REFERENCE_SIZE = 128


def kgm2_to_vil(vil_kgm2: np.ndarray) -> np.ndarray:
    """Encode physical VIL (kg/m^2) to SEVIR's uint8 0-255 scale; inverse of ``sevir.vil_to_kgm2``."""
    v = np.asarray(vil_kgm2, dtype=np.float32)
    linear = np.float32(2.0) + np.float32(90.66) * v  # SEVIR's 5 < X <= 18 branch
    logarithmic = np.float32(83.9) + np.float32(38.9) * np.log(np.maximum(v, np.float32(1e-6)))
    x = np.where(v <= np.float32(16.0 / 90.66), linear, np.maximum(logarithmic, np.float32(18.0)))
    x = np.where(x <= 5.0, 0.0, x)  # decodes to 0 anyway; SEVIR stores no-echo as 0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def power_law_noise(rng: np.random.Generator, n: int, beta: float) -> np.ndarray:
    """Periodic (n, n) float32 Gaussian noise with power spectrum ~ k^-beta, zero mean, unit variance."""
    white = rng.standard_normal((n, n))
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.rfftfreq(n)[None, :]
    k = np.hypot(kx, ky)
    k[0, 0] = np.inf  # no mean
    spectrum = np.fft.rfft2(white) * k ** (-beta / 2.0)
    field = np.fft.irfft2(spectrum, s=(n, n))
    field -= field.mean()
    return (field / field.std()).astype(np.float32)


def lifecycle(age: np.ndarray, lifetime: np.ndarray, peak_at: np.ndarray) -> np.ndarray:
    """Intensity factor 0..1 over a life: smooth growth to 1 at ``peak_at`` (fraction of life), then decay; 0 outside."""
    tau = age / lifetime
    rise = np.clip(tau / peak_at, 0.0, 1.0)
    fall = np.clip((1.0 - tau) / (1.0 - peak_at), 0.0, 1.0)
    s = np.where(tau < peak_at, rise, fall)
    return s * s * (3.0 - 2.0 * s)  # smoothstep: no kinks in the intensity curve


@dataclass(frozen=True)
class Flow:
    """Steering wind (slowly turning and changing speed) + a smooth divergence-free perturbation."""

    speed: float  # px/frame at t = 0
    direction: float  # radians at t = 0
    turn_rate: float  # radians/frame
    speed_rate: float  # px/frame per frame
    wavevectors: np.ndarray  # (M, 2) kx, ky in radians/px of the stream-function modes
    amplitudes: np.ndarray  # (M,) velocity amplitude of each mode, px/frame
    phases: np.ndarray  # (M,)
    phase_rates: np.ndarray  # (M,) radians/frame: the perturbation pattern evolves

    @classmethod
    def random(cls, rng: np.random.Generator, storm: bool) -> Flow:
        n_modes = 4
        wavelength = rng.uniform(90.0, 300.0, n_modes)
        angle = rng.uniform(0.0, 2.0 * np.pi, n_modes)
        k = 2.0 * np.pi / wavelength
        return cls(
            speed=float(rng.uniform(1.2, 4.0) if storm else rng.uniform(0.6, 3.5)),
            # Mostly eastward, as over the US, but any direction happens.
            direction=float(rng.normal(np.deg2rad(15.0), np.deg2rad(55.0))),
            turn_rate=float(rng.normal(0.0, np.deg2rad(0.4))),
            speed_rate=float(rng.normal(0.0, 0.01)),
            wavevectors=np.stack([k * np.cos(angle), k * np.sin(angle)], axis=1),
            amplitudes=rng.uniform(0.1, 0.35, n_modes),
            phases=rng.uniform(0.0, 2.0 * np.pi, n_modes),
            phase_rates=rng.normal(0.0, 0.03, n_modes),
        )

    def at(self, x: np.ndarray, y: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Velocity (u, v) in px/frame at positions x, y (any equal shapes) and frame t."""
        speed = max(self.speed + self.speed_rate * t, 0.3)
        heading = self.direction + self.turn_rate * t
        phase = x[..., None] * self.wavevectors[:, 0] + y[..., None] * self.wavevectors[:, 1]
        wave = self.amplitudes * np.cos(phase + self.phases + self.phase_rates * t)
        k = np.hypot(self.wavevectors[:, 0], self.wavevectors[:, 1])
        # u = d(psi)/dy, v = -d(psi)/dx for psi = sum A/k sin(k.x + phase): divergence-free.
        # (sums rather than matrix products: BLAS threads only slow down arrays this small)
        u = speed * np.cos(heading) + (wave * (self.wavevectors[:, 1] / k)).sum(axis=-1)
        v = speed * np.sin(heading) - (wave * (self.wavevectors[:, 0] / k)).sum(axis=-1)
        return u, v


@dataclass
class Blobs:
    """Elliptical generalized-Gaussian blobs over time; arrays are (T, B) unless noted."""

    x: np.ndarray  # centre, px
    y: np.ndarray
    amplitude: np.ndarray  # peak kg/m^2 (0 when not alive)
    semi_major: np.ndarray  # px
    semi_minor: np.ndarray
    orientation: np.ndarray  # (B,) radians
    shape: np.ndarray  # (B,) generalized-Gaussian exponent p: exp(-r^p); 2 is Gaussian

    @staticmethod
    def concat(parts: list[Blobs]) -> Blobs:
        return Blobs(
            *(
                np.concatenate([getattr(p, f) for p in parts], axis=1)
                for f in ("x", "y", "amplitude", "semi_major", "semi_minor")
            ),
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("orientation", "shape")),
        )


def _trajectories(
    flow: Flow, x0: np.ndarray, y0: np.ndarray, anchor: np.ndarray, frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """(T, B) positions of points carried by the flow that are at (x0, y0) at frame ``anchor`` (int, per point)."""
    xs = np.zeros((frames, x0.size))
    ys = np.zeros((frames, x0.size))
    xs[anchor, np.arange(x0.size)] = x0
    ys[anchor, np.arange(x0.size)] = y0
    for t in range(1, frames):  # forward from each anchor
        u, v = flow.at(xs[t - 1], ys[t - 1], t - 1)
        after = t > anchor
        xs[t] = np.where(after, xs[t - 1] + u, xs[t])
        ys[t] = np.where(after, ys[t - 1] + v, ys[t])
    for t in range(frames - 2, -1, -1):  # and backward
        u, v = flow.at(xs[t + 1], ys[t + 1], t)
        before = t < anchor
        xs[t] = np.where(before, xs[t + 1] - u, xs[t])
        ys[t] = np.where(before, ys[t + 1] - v, ys[t])
    return xs, ys


@dataclass(frozen=True)
class Climate:
    """How active an event is: storm events ('S') get more and stronger cells than random ones ('R')."""

    systems_per_frame_area: float  # mean number of systems per 128x128 px, beyond the guaranteed ones
    min_systems: int
    envelope_kgm2: float  # median peak of a stratiform envelope
    cores_per_frame: float  # births of convective cores per system per frame
    core_kgm2: float  # median peak of a convective core

    @classmethod
    def of(cls, storm: bool) -> Climate:
        if storm:  # tuned so that ~70 % of pixels are < 16, a few % >= 133 and < 1 % >= 181 at 128 px
            return cls(systems_per_frame_area=2.5, min_systems=1, envelope_kgm2=1.6, cores_per_frame=0.45, core_kgm2=8)
        return cls(systems_per_frame_area=1.5, min_systems=0, envelope_kgm2=0.7, cores_per_frame=0.15, core_kgm2=3)


def _systems(
    rng: np.random.Generator, size: int, frames: int, flow: Flow, climate: Climate
) -> tuple[Blobs, np.ndarray]:
    """Stratiform envelopes, and the (T, B) life factor of each (cores live only inside a live system)."""
    area = (size / _REFERENCE_SIZE) ** 2
    n = climate.min_systems + rng.poisson(climate.systems_per_frame_area * area)
    # Each system crosses the frame around its own anchor frame, and is at its strongest then.
    # The guaranteed ones are the storm the event is about: near the centre at the event time
    # (mid-event), as SEVIR centres storm events on a storm report.
    anchor = rng.integers(0, frames, n)
    anchor[: climate.min_systems] = frames // 2
    margin = 0.1 * size
    x0, y0 = rng.uniform(-margin, size + margin, (2, n))
    x0[: climate.min_systems], y0[: climate.min_systems] = rng.uniform(0.3 * size, 0.7 * size, (2, climate.min_systems))
    x, y = _trajectories(flow, x0, y0, anchor, frames)
    lifetime = rng.uniform(1.0, 3.0, n) * frames
    peak_at = rng.uniform(0.3, 0.6, n)
    birth = anchor - peak_at * lifetime + rng.normal(0.0, 0.15, n) * lifetime
    life = lifecycle(np.arange(frames)[:, None] - birth, lifetime, peak_at)
    peak = climate.envelope_kgm2 * rng.lognormal(0.0, 0.45, n)
    semi_major = rng.uniform(18.0, 50.0, n)
    grow = 0.55 + 0.45 * life  # an envelope widens as it matures
    blobs = Blobs(
        x=x, y=y, amplitude=peak * life,
        semi_major=semi_major * grow, semi_minor=semi_major / rng.uniform(1.0, 2.6, n) * grow,
        orientation=rng.uniform(0.0, np.pi, n), shape=rng.uniform(1.4, 2.6, n),
    )  # fmt: skip
    return blobs, life


def _cores(rng: np.random.Generator, systems: Blobs, system_life: np.ndarray, frames: int, climate: Climate) -> Blobs:
    """Convective cores born inside each system, often next to an earlier core (so they merge)."""
    parts = []
    t = np.arange(frames)[:, None]
    for s in range(systems.orientation.size):
        n = rng.poisson(climate.cores_per_frame * (frames + 20))
        if n == 0:
            continue
        lifetime = rng.uniform(10.0, 40.0, n)  # 50 min .. 3.3 h (multicell clusters)
        birth = rng.uniform(-20.0, frames, n)
        # Offsets along the envelope's own axes, so lines of cores follow an elongated system.
        along = rng.normal(0.0, 0.55, n) * systems.semi_major[:, s].max()
        across = rng.normal(0.0, 0.55, n) * systems.semi_minor[:, s].max()
        # Some cores are daughters of an earlier one: born a few km away while the parent is mature.
        for i in range(1, n):
            if rng.random() < 0.4:
                parent = rng.integers(0, i)
                birth[i] = birth[parent] + rng.uniform(0.2, 0.6) * lifetime[parent]
                step = rng.uniform(4.0, 10.0)
                angle = rng.uniform(0.0, 2.0 * np.pi)
                along[i] = along[parent] + step * np.cos(angle)
                across[i] = across[parent] + step * np.sin(angle)
        c, si = np.cos(systems.orientation[s]), np.sin(systems.orientation[s])
        dx, dy = c * along - si * across, si * along + c * across
        # Cores propagate relative to their system (e.g. right-movers): a small drift of their own.
        drift_x, drift_y = rng.normal(0.0, 0.2, n), rng.normal(0.0, 0.2, n)
        age = t - birth
        life = lifecycle(age, lifetime, rng.uniform(0.25, 0.5, n)) * np.minimum(1.0, 2.0 * system_life[:, s : s + 1])
        peak = climate.core_kgm2 * rng.lognormal(0.0, 0.75, n)
        semi_major = rng.uniform(4.0, 10.0, n)
        grow = 0.5 + 0.5 * life
        parts.append(Blobs(
            x=systems.x[:, s : s + 1] + dx + drift_x * (t - frames // 2),
            y=systems.y[:, s : s + 1] + dy + drift_y * (t - frames // 2),
            amplitude=peak * life,
            semi_major=semi_major * grow, semi_minor=semi_major / rng.uniform(1.0, 2.0, n) * grow,
            orientation=rng.uniform(0.0, np.pi, n), shape=rng.uniform(1.5, 2.5, n),
        ))  # fmt: skip
    if not parts:
        return Blobs(*(np.zeros((frames, 0)),) * 5, np.zeros(0), np.zeros(0))
    return Blobs.concat(parts)


def _add_blobs(frame: np.ndarray, blobs: Blobs, t: int) -> None:
    """Add the blobs alive at frame t to ``frame`` (H, W, kg/m^2), each over its bounding box only."""
    height, width = frame.shape
    for b in np.flatnonzero(blobs.amplitude[t] > _NEGLIGIBLE_KGM2):
        amp, p = blobs.amplitude[t, b], blobs.shape[b]
        a, c_minor = blobs.semi_major[t, b], blobs.semi_minor[t, b]
        reach = a * np.log(amp / _NEGLIGIBLE_KGM2) ** (1.0 / p)
        cx, cy = blobs.x[t, b], blobs.y[t, b]
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, width)
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, height)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx))[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]
        cos, sin = np.float32(np.cos(blobs.orientation[b])), np.float32(np.sin(blobs.orientation[b]))
        r2 = ((cos * dx + sin * dy) / np.float32(a)) ** 2 + ((cos * dy - sin * dx) / np.float32(c_minor)) ** 2
        frame[y0:y1, x0:x1] += np.float32(amp) * np.exp(-(r2 ** np.float32(p / 2.0)))


class _Texture:
    """Log-normal multi-scale texture carried by the flow (semi-Lagrangian), renewed as it ages.

    Two layers of power-law noise cross-fade (weights sin and cos of the layer's age, so
    the variance stays 1); a layer that fades out is reborn with fresh noise. Each layer
    tracks how far its pattern has travelled since birth, D_t(x) = u(x) + D_{t-1}(x - u(x)),
    on a coarse grid (the flow is smooth on scales of 90+ px), interpolated onto the pixels.
    Renewal keeps the shear of the flow from stretching the pattern into streaks.
    """

    step = 8  # coarse-grid spacing, px

    def __init__(self, rng: np.random.Generator, size: int, flow: Flow):
        self.rng, self.flow, self.size = rng, flow, size
        self.tex_size = 2 * size  # periodic; twice the frame so the pattern does not visibly repeat
        self.beta = rng.uniform(2.2, 3.0)  # spectral slope: lower is rougher
        self.sigma = np.float32(rng.uniform(0.5, 0.8))
        self.half_life = int(rng.integers(18, 37))  # frames between rebirths of one layer
        n_coarse = size // self.step + 2
        self.coarse_y, self.coarse_x = np.mgrid[0:n_coarse, 0:n_coarse] * float(self.step)
        self.noise = [power_law_noise(rng, self.tex_size, self.beta) for _ in range(2)]
        self.displacement = [np.zeros((n_coarse, n_coarse), np.complex128) for _ in range(2)]
        self.age = [0, self.half_life]  # layer 1 starts half-way through its life: never both faded
        self._update_negligible()

    def advance(self, t: int) -> None:
        """Carry the texture from frame t - 1 to frame t."""
        u, v = self.flow.at(self.coarse_x, self.coarse_y, t - 1)
        back = np.array([self.coarse_y - v, self.coarse_x - u]) / self.step
        for layer in range(2):
            self.age[layer] += 1
            if self.age[layer] == 2 * self.half_life:  # faded out: reborn
                self.age[layer] = 0
                self.noise[layer] = power_law_noise(self.rng, self.tex_size, self.beta)
                self.displacement[layer][:] = 0.0
                self._update_negligible()
            else:
                moved = ndimage.map_coordinates(self.displacement[layer], back, order=1, mode="nearest")
                self.displacement[layer] = (u + 1j * v) + moved

    def apply(self, field: np.ndarray) -> None:
        """Multiply ``field`` (size, size, kg/m^2) in place by the texture (mean about 1) at the current frame.

        Only pixels that could still encode above 0 after the largest possible factor are sampled.
        """
        rows, cols = np.nonzero(field > self.negligible)
        if rows.size == 0:
            return
        # Bilinear weights of each pixel between the coarse-grid nodes around it.
        iy, fy = np.divmod(rows, self.step)
        ix, fx = np.divmod(cols, self.step)
        fy, fx = fy / self.step, fx / self.step
        noise = np.zeros(rows.size, np.float32)
        for layer in range(2):
            weight = np.float32(np.sin(0.5 * np.pi * self.age[layer] / self.half_life))
            d = self.displacement[layer]
            top = d[iy, ix] * (1.0 - fx) + d[iy, ix + 1] * fx
            bottom = d[iy + 1, ix] * (1.0 - fx) + d[iy + 1, ix + 1] * fx
            moved = top * (1.0 - fy) + bottom * fy  # x + iy, px
            source = np.array([rows - moved.imag, cols - moved.real])
            noise += weight * ndimage.map_coordinates(self.noise[layer], source, order=1, mode="grid-wrap")
        field[rows, cols] *= np.exp(self.sigma * noise - self.sigma * self.sigma / 2)

    def _update_negligible(self) -> None:
        # kg/m^2 below which a pixel encodes to 0 whatever factor the texture could give it.
        largest = np.exp(self.sigma * (np.abs(self.noise[0]).max() + np.abs(self.noise[1]).max()))
        self.negligible = 3.0 / 90.66 / float(largest)


def render_event(rng: np.random.Generator, size: int, frames: int, storm: bool) -> np.ndarray:
    """One event's VIL, uint8 (size, size, frames) on the 0-255 scale (SEVIR's H x W x T)."""
    climate = Climate.of(storm)
    flow = Flow.random(rng, storm)
    systems, system_life = _systems(rng, size, frames, flow, climate)
    blobs = Blobs.concat([systems, _cores(rng, systems, system_life, frames, climate)])
    texture = _Texture(rng, size, flow)

    vil = np.empty((size, size, frames), np.uint8)
    field = np.empty((size, size), np.float32)
    for t in range(frames):
        if t:
            texture.advance(t)
        field[:] = 0.0
        _add_blobs(field, blobs, t)
        texture.apply(field)
        vil[:, :, t] = kgm2_to_vil(field)
    return vil
