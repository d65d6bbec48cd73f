"""WGS84 geodesy, local tangent plane and uncertainty ellipses.

The models work in a local east/north plane (metres) tangent to the WGS84 ellipsoid at an
origin; this module maps that plane to latitude/longitude exactly (through ECEF), measures
geodesic distances (Vincenty) and turns 2x2 east/north covariances into confidence ellipses
and GeoJSON. Angles are degrees, lengths metres, bearings clockwise from north.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import numpy as np
import numpy.typing as npt

WGS84_A = 6_378_137.0
WGS84_F = 1.0 / 298.257223563
WGS84_B = WGS84_A * (1.0 - WGS84_F)
WGS84_E2 = WGS84_F * (2.0 - WGS84_F)
MEAN_RADIUS_M = (2.0 * WGS84_A + WGS84_B) / 3.0

FloatArray = npt.NDArray[np.float64]
# Scalars in give floats out, arrays in give arrays out (elementwise, same shape).
Coord = TypeVar("Coord", float, FloatArray)


def _like(value: FloatArray) -> Any:
    return float(value) if np.ndim(value) == 0 else value


def _geodetic_to_ecef(lat: FloatArray, lon: FloatArray) -> tuple[FloatArray, ...]:
    """ECEF (m) of points on the ellipsoid surface (height 0) from radians."""
    n = WGS84_A / np.sqrt(1.0 - WGS84_E2 * np.sin(lat) ** 2)
    return (
        n * np.cos(lat) * np.cos(lon),
        n * np.cos(lat) * np.sin(lon),
        n * (1.0 - WGS84_E2) * np.sin(lat),
    )


def _ecef_to_geodetic(x: FloatArray, y: FloatArray, z: FloatArray) -> tuple[FloatArray, ...]:
    """Geodetic latitude/longitude (radians) of ECEF points, by Bowring's iteration."""
    p = np.hypot(x, y)
    ep2 = WGS84_E2 / (1.0 - WGS84_E2)
    beta = np.arctan2(z, (1.0 - WGS84_F) * p)
    lat = beta
    # Bowring converges cubically; three passes are far below a micrometre near the surface.
    for _ in range(3):
        lat = np.arctan2(
            z + ep2 * WGS84_B * np.sin(beta) ** 3, p - WGS84_E2 * WGS84_A * np.cos(beta) ** 3
        )
        beta = np.arctan2((1.0 - WGS84_F) * np.sin(lat), np.cos(lat))
    return lat, np.arctan2(y, x)


def _enu_axes(lat0_deg: float, lon0_deg: float) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Unit east, north, up vectors (ECEF) of the tangent plane at the origin."""
    la, lo = math.radians(lat0_deg), math.radians(lon0_deg)
    east = np.array([-math.sin(lo), math.cos(lo), 0.0])
    north = np.array([-math.sin(la) * math.cos(lo), -math.sin(la) * math.sin(lo), math.cos(la)])
    up = np.array([math.cos(la) * math.cos(lo), math.cos(la) * math.sin(lo), math.sin(la)])
    return east, north, up


def geodetic_to_enu(
    lat_deg: Coord, lon_deg: Coord, lat0_deg: float, lon0_deg: float
) -> tuple[Coord, Coord]:
    """East/north (m) in the tangent plane at (lat0_deg, lon0_deg) of surface points (deg).

    The point on the ellipsoid (height 0) is projected along the origin's vertical onto the
    plane; the up component is dropped. Exact inverse of ``enu_to_geodetic``.
    """
    lat, lon = np.radians(np.asarray(lat_deg, float)), np.radians(np.asarray(lon_deg, float))
    p = np.stack(_geodetic_to_ecef(lat, lon), axis=-1)
    p0 = np.array(_geodetic_to_ecef(np.radians(lat0_deg), np.radians(lon0_deg)))
    east, north, _ = _enu_axes(lat0_deg, lon0_deg)
    d = p - p0
    return _like(d @ east), _like(d @ north)


def enu_to_geodetic(
    east_m: Coord, north_m: Coord, lat0_deg: float, lon0_deg: float
) -> tuple[Coord, Coord]:
    """Latitude/longitude (deg) of tangent-plane points (m) at origin (lat0_deg, lon0_deg).

    The plane point is moved along the origin's vertical onto the ellipsoid surface (the near
    intersection), which makes this the exact inverse of ``geodetic_to_enu``. Points farther
    than about an Earth radius from the origin have no intersection and give NaN.
    """
    e, n = np.asarray(east_m, float), np.asarray(north_m, float)
    east, north, up = _enu_axes(lat0_deg, lon0_deg)
    p0 = np.array(_geodetic_to_ecef(np.radians(lat0_deg), np.radians(lon0_deg)))
    # Work in units of the semi-axes so the ellipsoid is the unit sphere: the quadratic in the
    # vertical offset t then has well-scaled coefficients.
    scale = np.array([WGS84_A, WGS84_A, WGS84_B])
    q = (p0 + e[..., None] * east + n[..., None] * north) / scale
    u = up / scale
    qa = u @ u
    qb = 2.0 * (q @ u)
    qc = np.sum(q * q, axis=-1) - 1.0
    with np.errstate(invalid="ignore"):
        # Stable form of the root nearer zero, so small offsets keep full precision.
        t = -2.0 * qc / (qb + np.sqrt(qb * qb - 4.0 * qa * qc))
    x, y, z = np.moveaxis((q + t[..., None] * u) * scale, -1, 0)
    lat, lon = _ecef_to_geodetic(x, y, z)
    return _like(np.degrees(lat)), _like(np.degrees(lon))


# Scalars give a float, anything with an array gives an array; the overlap is intended.
@overload
def geodesic_distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float: ...  # type: ignore[overload-overlap]
@overload
def geodesic_distance_m(
    lat1: float | FloatArray,
    lon1: float | FloatArray,
    lat2: float | FloatArray,
    lon2: float | FloatArray,
) -> FloatArray: ...
def geodesic_distance_m(
    lat1: float | FloatArray,
    lon1: float | FloatArray,
    lat2: float | FloatArray,
    lon2: float | FloatArray,
) -> Any:
    """Geodesic distance (m) between points (deg) on the WGS84 ellipsoid, Vincenty's inverse.

    Inputs broadcast. Nearly antipodal pairs, where Vincenty's iteration does not converge,
    fall back to a great-circle distance on the mean-radius sphere (error < 0.5 %).
    """
    phi1, phi2 = np.radians(np.asarray(lat1, float)), np.radians(np.asarray(lat2, float))
    dlon = np.asarray(lon2, float) - np.asarray(lon1, float)
    big_l = np.radians((dlon + 180.0) % 360.0 - 180.0)
    u1 = np.arctan((1.0 - WGS84_F) * np.tan(phi1))
    u2 = np.arctan((1.0 - WGS84_F) * np.tan(phi2))
    su1, cu1, su2, cu2 = np.sin(u1), np.cos(u1), np.sin(u2), np.cos(u2)
    lam = big_l
    converged = np.zeros(np.shape(lam), bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        for _ in range(200):
            s_sig = np.hypot(cu2 * np.sin(lam), cu1 * su2 - su1 * cu2 * np.cos(lam))
            c_sig = su1 * su2 + cu1 * cu2 * np.cos(lam)
            sig = np.arctan2(s_sig, c_sig)
            s_alpha = np.where(s_sig > 0, cu1 * cu2 * np.sin(lam) / s_sig, 0.0)
            c2_alpha = 1.0 - s_alpha**2
            # On the equator cos²α = 0 and the cos 2σm term drops out.
            c_2sm = np.where(c2_alpha > 0, c_sig - 2.0 * su1 * su2 / c2_alpha, 0.0)
            c = WGS84_F / 16.0 * c2_alpha * (4.0 + WGS84_F * (4.0 - 3.0 * c2_alpha))
            lam_next = big_l + (1.0 - c) * WGS84_F * s_alpha * (
                sig + c * s_sig * (c_2sm + c * c_sig * (-1.0 + 2.0 * c_2sm**2))
            )
            converged = np.abs(lam_next - lam) < 1e-12
            lam = lam_next
            if np.all(converged):
                break
        usq = c2_alpha * (WGS84_A**2 - WGS84_B**2) / WGS84_B**2
        a = 1.0 + usq / 16384.0 * (4096.0 + usq * (-768.0 + usq * (320.0 - 175.0 * usq)))
        b = usq / 1024.0 * (256.0 + usq * (-128.0 + usq * (74.0 - 47.0 * usq)))
        term = b / 6.0 * c_2sm * (-3.0 + 4.0 * s_sig**2) * (-3.0 + 4.0 * c_2sm**2)
        d_sig = b * s_sig * (c_2sm + b / 4.0 * (c_sig * (-1.0 + 2.0 * c_2sm**2) - term))
        dist = WGS84_B * a * (sig - d_sig)
    hav = np.sin((phi2 - phi1) / 2) ** 2 + np.cos(phi1) * np.cos(phi2) * np.sin(big_l / 2) ** 2
    sphere = 2.0 * MEAN_RADIUS_M * np.arcsin(np.sqrt(np.clip(hav, 0.0, 1.0)))
    # |λ| > π is Vincenty's own sign of divergence, even when the steps happen to be small.
    ok = converged & (np.abs(lam) <= np.pi) & np.isfinite(dist)
    dist = np.where(ok, dist, sphere)
    return _like(dist)


def chi2_scale(confidence: float) -> float:
    """Ellipse scale k (dimensionless) so a 2-D Gaussian falls inside k·σ with `confidence`.

    For 2 degrees of freedom the chi-square quantile is closed-form: k = sqrt(-2 ln(1 - p)).
    The confidence is the probability itself: 0.68 gives k = 1.5096, 0.95 gives k = 2.448
    (the 1-sigma region, p = 0.6827, would be k = 1.5152 and is not what "0.68" means here).
    """
    p = confidence
    if not 0.0 < p < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return math.sqrt(-2.0 * math.log(1.0 - p))


CHI2_SCALE: dict[float, float] = {c: chi2_scale(c) for c in (0.68, 0.95)}


@dataclass(frozen=True)
class Ellipse:
    """Confidence ellipse: semi-axes in metres, major-axis bearing in degrees [0, 180)."""

    confidence: float
    semi_major_m: float
    semi_minor_m: float
    orientation_deg: float
    scale_k: float | None = None
    """The k of the ellipse k·σ drawn from a covariance (None when given by its axes)."""


def covariance_from_params(sigma_e_m: float, sigma_n_m: float, rho: float) -> FloatArray:
    """2x2 east/north covariance (m²) from standard deviations (m) and correlation rho."""
    if sigma_e_m < 0 or sigma_n_m < 0 or not -1.0 <= rho <= 1.0:
        raise ValueError(f"invalid sigmas/correlation: {sigma_e_m}, {sigma_n_m}, {rho}")
    c = rho * sigma_e_m * sigma_n_m
    return np.array([[sigma_e_m**2, c], [c, sigma_n_m**2]], dtype=float)


def _checked_covariance(cov: npt.ArrayLike) -> FloatArray:
    m = np.asarray(cov, dtype=float)
    if m.shape != (2, 2) or not np.all(np.isfinite(m)):
        raise ValueError(f"covariance must be a finite 2x2 matrix, got {m!r}")
    if abs(m[0, 1] - m[1, 0]) > 1e-9 * np.max(np.abs(m)):
        raise ValueError(f"covariance is not symmetric: {m!r}")
    m = (m + m.T) / 2.0
    if not (m[0, 0] > 0 and np.linalg.det(m) > 0):
        raise ValueError(f"covariance is not positive definite: {m!r}")
    return m


def theta_deg(cov: npt.ArrayLike) -> float:
    """Bearing (deg, clockwise from north, in [0, 180)) of the major axis of an E/N covariance."""
    m = _checked_covariance(cov)
    # Closed form avoids eigenvector sign/ordering ambiguity; a circle reports 0.
    if math.isclose(m[0, 0], m[1, 1], rel_tol=1e-12) and abs(m[0, 1]) <= 1e-12 * m[0, 0]:
        return 0.0
    from_east = 0.5 * math.degrees(math.atan2(2.0 * m[0, 1], m[0, 0] - m[1, 1]))
    bearing = (90.0 - from_east) % 180.0
    return 0.0 if bearing >= 180.0 else bearing


def ellipse_from_covariance(
    cov: npt.ArrayLike, confidence: float, scale_k: float | None = None
) -> Ellipse:
    """Confidence ellipse of a 2x2 east/north covariance (m²); raises ValueError if not SPD.

    The semi-axes are ``scale_k`` times the covariance's standard deviations along its
    axes; without ``scale_k`` it is the Gaussian's, :func:`chi2_scale` of ``confidence``.
    A model whose errors are not Gaussian gives its own calibrated k per confidence.
    """
    m = _checked_covariance(cov)
    lo, hi = np.linalg.eigh(m)[0]
    k = chi2_scale(confidence) if scale_k is None else scale_k
    if not k > 0.0:
        raise ValueError(f"ellipse scale k must be positive, got {k}")
    return Ellipse(confidence, k * math.sqrt(hi), k * math.sqrt(lo), theta_deg(m), k)


def ellipse_polygon_enu(
    center_e: float, center_n: float, ellipse: Ellipse, n_points: int = 72
) -> FloatArray:
    """(n_points, 2) east/north vertices (m), counter-clockwise, first vertex on the major axis.

    The ring is not closed (the first vertex is not repeated).
    """
    if n_points < 3:
        raise ValueError("an ellipse polygon needs at least 3 points")
    th = math.radians(ellipse.orientation_deg)
    major = np.array([math.sin(th), math.cos(th)])
    minor = np.array([-major[1], major[0]])  # major rotated +90°, so the ring turns CCW
    t = np.linspace(0.0, 2.0 * math.pi, n_points, endpoint=False)[:, None]
    return (
        np.array([center_e, center_n])
        + ellipse.semi_major_m * np.cos(t) * major
        + ellipse.semi_minor_m * np.sin(t) * minor
    )


def ellipse_polygon_lonlat(
    center_e: float,
    center_n: float,
    ellipse: Ellipse,
    lat0_deg: float,
    lon0_deg: float,
    n_points: int = 72,
) -> list[list[float]]:
    """Closed counter-clockwise GeoJSON ring [[lon, lat], ...] (deg, 7 decimals) of an ellipse.

    The ellipse is centred at (center_e, center_n) metres in the tangent plane at
    (lat0_deg, lon0_deg), where its covariance was expressed. The first vertex is repeated
    at the end (RFC 7946). Rings crossing the antimeridian are not split.
    """
    return _rings_lonlat(
        ellipse_polygon_enu(center_e, center_n, ellipse, n_points)[None], lat0_deg, lon0_deg
    )[0]


def _rings_lonlat(
    points_enu: FloatArray, lat0_deg: float, lon0_deg: float
) -> list[list[list[float]]]:
    """Closed GeoJSON rings (deg, 7 decimals) of (K, n, 2) east/north vertices (m), in one pass."""
    lat, lon = enu_to_geodetic(points_enu[..., 0], points_enu[..., 1], lat0_deg, lon0_deg)
    rings = np.round(np.stack([lon, lat], axis=-1), 7).tolist()
    return [[*ring, ring[0]] for ring in rings]


def localization_geojson(
    lat: float,
    lon: float,
    ellipses: list[Ellipse],
    center_enu: tuple[float, float],
    origin: tuple[float, float],
    n_points: int = 72,
) -> dict[str, Any]:
    """GeoJSON FeatureCollection: the estimate (deg) as a Point plus one Polygon per ellipse.

    ``center_enu`` is the estimate's (east, north) in metres in the tangent plane at
    ``origin`` = (lat0, lon0) degrees, where the covariance was expressed; the polygons'
    vertices lie on the ellipse in the tangent plane at the estimate itself.
    """
    features: list[dict[str, Any]] = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [round(lon, 7), round(lat, 7)]},
            "properties": {"kind": "estimate"},
        }
    ]
    # Draw each ellipse in the tangent plane at the estimate: the covariance axes, given in
    # the origin's frame, turn by the meridian convergence between the two points.
    ahead_lat, ahead_lon = enu_to_geodetic(center_enu[0], center_enu[1] + 1_000.0, *origin)
    de, dn = geodetic_to_enu(ahead_lat, ahead_lon, lat, lon)
    turn = math.degrees(math.atan2(float(de), float(dn)))
    local = [
        Ellipse(ell.confidence, ell.semi_major_m, ell.semi_minor_m, ell.orientation_deg + turn)
        for ell in ellipses
    ]
    points = np.array([ellipse_polygon_enu(0.0, 0.0, ell, n_points) for ell in local])
    rings = _rings_lonlat(points.reshape(len(local), n_points, 2), lat, lon) if local else []
    for ell, ring in zip(ellipses, rings, strict=True):
        properties: dict[str, Any] = {
            "kind": "ellipse",
            "confidence": ell.confidence,
            "semi_major_m": round(ell.semi_major_m, 3),
            "semi_minor_m": round(ell.semi_minor_m, 3),
            "orientation_deg": round(ell.orientation_deg, 3),
        }
        if ell.scale_k is not None:
            properties["scale_k"] = round(ell.scale_k, 4)
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": properties,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def hull_distance_m(points_m: npt.ArrayLike, vertices_m: npt.ArrayLike) -> FloatArray:
    """Signed distance (m) of (N, 2) points to the convex hull of (S, 2) vertices.

    Negative inside the hull (minus the distance to its boundary), positive outside.
    Both in the same plane coordinates (metres, e.g. east/north of the network centre).
    """
    from scipy.spatial import ConvexHull

    pts = np.atleast_2d(np.asarray(points_m, dtype=float))
    verts = np.asarray(vertices_m, dtype=float)
    hull = ConvexHull(verts)
    ring = verts[hull.vertices]  # counter-clockwise
    a, b = ring, np.roll(ring, -1, axis=0)
    ab = b - a
    ap = pts[:, None, :] - a[None]
    t = np.clip((ap * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)
    nearest = a[None] + t[..., None] * ab[None]
    dist = np.linalg.norm(pts[:, None, :] - nearest, axis=-1).min(axis=1)
    # Inside a counter-clockwise ring every edge has the point on its left.
    cross = ab[None, :, 0] * ap[..., 1] - ab[None, :, 1] * ap[..., 0]
    inside = np.all(cross >= 0.0, axis=1)
    return np.where(inside, -dist, dist)
