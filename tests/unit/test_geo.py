"""Known-answer tests for heimdall.geo (WGS84 plane mapping, Vincenty, ellipses, GeoJSON)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from heimdall.geo import (
    CHI2_SCALE,
    Ellipse,
    covariance_from_params,
    ellipse_from_covariance,
    ellipse_polygon_enu,
    ellipse_polygon_lonlat,
    enu_to_geodetic,
    geodesic_distance_m,
    geodetic_to_enu,
    localization_geojson,
    theta_deg,
)

LAT0, LON0 = 45.0, 8.0


def _dms(deg: int, minutes: int, seconds: float) -> float:
    sign = -1.0 if deg < 0 else 1.0
    return sign * (abs(deg) + minutes / 60.0 + seconds / 3600.0)


def _signed_area(ring: list[list[float]]) -> float:
    xy = np.asarray(ring, dtype=float)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


# ---------------------------------------------------------------- tangent plane


def test_enu_round_trip_sub_millimetre_up_to_300_km() -> None:
    bearings = np.radians(np.arange(0.0, 360.0, 15.0))
    ranges = np.array([1.0, 1_000.0, 50_000.0, 150_000.0, 300_000.0])
    r, b = np.meshgrid(ranges, bearings)
    east, north = (r * np.sin(b)).ravel(), (r * np.cos(b)).ravel()

    lat, lon = enu_to_geodetic(east, north, LAT0, LON0)
    east2, north2 = geodetic_to_enu(lat, lon, LAT0, LON0)
    assert np.max(np.hypot(east2 - east, north2 - north)) < 1e-3

    lat2, lon2 = enu_to_geodetic(east2, north2, LAT0, LON0)
    assert np.max(geodesic_distance_m(lat, lon, lat2, lon2)) < 1e-3


def test_geodetic_round_trip_from_geodetic_side() -> None:
    lat = np.array([45.0, 47.5, 42.3, 44.1, 45.0])
    lon = np.array([8.0, 9.1, 6.2, 11.8, 8.00001])
    east, north = geodetic_to_enu(lat, lon, LAT0, LON0)
    lat2, lon2 = enu_to_geodetic(east, north, LAT0, LON0)
    assert np.max(geodesic_distance_m(lat, lon, lat2, lon2)) < 1e-3


def test_scalars_in_floats_out() -> None:
    lat, lon = enu_to_geodetic(1_000.0, -2_000.0, LAT0, LON0)
    assert isinstance(lat, float) and isinstance(lon, float)
    east, north = geodetic_to_enu(lat, lon, LAT0, LON0)
    assert isinstance(east, float) and isinstance(north, float)
    assert east == pytest.approx(1_000.0, abs=1e-6)
    assert north == pytest.approx(-2_000.0, abs=1e-6)
    assert isinstance(geodesic_distance_m(LAT0, LON0, lat, lon), float)


def test_origin_maps_to_zero() -> None:
    assert geodetic_to_enu(LAT0, LON0, LAT0, LON0) == pytest.approx((0.0, 0.0), abs=1e-9)
    assert enu_to_geodetic(0.0, 0.0, LAT0, LON0) == pytest.approx((LAT0, LON0), abs=1e-12)


def test_point_1000_m_north_is_1000_m_away_due_north() -> None:
    lat, lon = enu_to_geodetic(0.0, 1_000.0, LAT0, LON0)
    assert geodesic_distance_m(LAT0, LON0, lat, lon) == pytest.approx(1_000.0, abs=0.01)
    assert lon == pytest.approx(LON0, abs=1e-12)
    assert lat > LAT0


def test_point_1000_m_east_is_1000_m_away() -> None:
    lat, lon = enu_to_geodetic(1_000.0, 0.0, LAT0, LON0)
    assert geodesic_distance_m(LAT0, LON0, lat, lon) == pytest.approx(1_000.0, abs=0.01)
    assert lon > LON0


# ---------------------------------------------------------------- Vincenty


def test_vincenty_flinders_peak_to_buninyong() -> None:
    # Vincenty (1975) / Geoscience Australia worked example: 54 972.271 m.
    flinders = (_dms(-37, 57, 3.72030), _dms(144, 25, 29.52440))
    buninyong = (_dms(-37, 39, 10.15610), _dms(143, 55, 35.38390))
    d = geodesic_distance_m(*flinders, *buninyong)
    assert d == pytest.approx(54_972.271, abs=1e-3)


def test_vincenty_quarter_meridian_and_equator_degree() -> None:
    # WGS84 equator-to-pole meridian arc is 10 001 965.729 m; one degree of equator is a·π/180.
    assert geodesic_distance_m(0.0, 0.0, 90.0, 0.0) == pytest.approx(10_001_965.729, abs=1e-3)
    assert geodesic_distance_m(0.0, 0.0, 0.0, 1.0) == pytest.approx(
        6_378_137.0 * math.pi / 180.0, abs=1e-6
    )


def test_vincenty_symmetric_zero_and_antimeridian() -> None:
    assert geodesic_distance_m(LAT0, LON0, LAT0, LON0) == 0.0
    d1 = geodesic_distance_m(10.0, 179.5, 10.5, -179.5)
    d2 = geodesic_distance_m(10.5, -179.5, 10.0, 179.5)
    assert d1 == pytest.approx(d2, abs=1e-6)
    assert d1 < 200_000.0


def test_vincenty_near_antipodal_falls_back() -> None:
    # Vincenty does not converge here; the reference (Karney) distance is 19 936 288.579 m.
    d = geodesic_distance_m(0.0, 0.0, 0.5, 179.7)
    assert math.isfinite(d)
    assert d == pytest.approx(19_936_288.579, rel=5e-3)


def test_vincenty_broadcasts_arrays() -> None:
    lats = np.array([45.0, 45.1, 46.0])
    d = geodesic_distance_m(lats, np.full(3, 8.0), LAT0, LON0)
    assert d.shape == (3,)
    assert d[0] == 0.0
    assert d[1] == pytest.approx(11_116.0, rel=1e-3)


# ---------------------------------------------------------------- uncertainty


def test_chi2_scales() -> None:
    assert round(CHI2_SCALE[0.68], 4) == 1.5096  # p = 0.68 itself, not the 1-sigma 0.6827
    assert round(CHI2_SCALE[0.95], 3) == 2.448


def test_covariance_from_params() -> None:
    cov = covariance_from_params(30.0, 40.0, 0.5)
    np.testing.assert_allclose(cov, [[900.0, 600.0], [600.0, 1600.0]])
    with pytest.raises(ValueError):
        covariance_from_params(30.0, 40.0, 1.5)


def test_diagonal_covariance_ellipse() -> None:
    ell = ellipse_from_covariance(np.diag([400.0**2, 100.0**2]), 0.95)
    k = CHI2_SCALE[0.95]
    assert ell.confidence == 0.95
    assert ell.semi_major_m == pytest.approx(400.0 * k)
    assert ell.semi_minor_m == pytest.approx(100.0 * k)
    assert ell.orientation_deg == pytest.approx(90.0)
    assert ell.scale_k == pytest.approx(k)


def test_a_calibrated_k_replaces_the_chi_square_one() -> None:
    """Heavy-tailed errors: the ellipse is the given k times the covariance's axes."""
    cov = np.diag([400.0**2, 100.0**2])
    ell = ellipse_from_covariance(cov, 0.95, scale_k=3.2)
    assert (ell.semi_major_m, ell.semi_minor_m, ell.scale_k) == pytest.approx((1280.0, 320.0, 3.2))
    assert ell.orientation_deg == pytest.approx(90.0)
    with pytest.raises(ValueError):
        ellipse_from_covariance(cov, 0.95, scale_k=0.0)


def test_north_elongated_covariance_points_north() -> None:
    assert theta_deg(np.diag([100.0**2, 400.0**2])) == pytest.approx(0.0)


def test_equal_sigmas_positive_rho_is_45_degrees() -> None:
    cov = covariance_from_params(100.0, 100.0, 0.6)
    assert theta_deg(cov) == pytest.approx(45.0)
    ell = ellipse_from_covariance(cov, 0.68)
    k = CHI2_SCALE[0.68]
    assert ell.semi_major_m == pytest.approx(k * 100.0 * math.sqrt(1.6))
    assert ell.semi_minor_m == pytest.approx(k * 100.0 * math.sqrt(0.4))
    assert theta_deg(covariance_from_params(100.0, 100.0, -0.6)) == pytest.approx(135.0)


def test_orientation_matches_eigenvector() -> None:
    cov = covariance_from_params(250.0, 120.0, -0.35)
    vals, vecs = np.linalg.eigh(cov)
    major = vecs[:, int(np.argmax(vals))]
    expected = math.degrees(math.atan2(major[0], major[1])) % 180.0
    assert theta_deg(cov) == pytest.approx(expected)
    assert 0.0 <= theta_deg(cov) < 180.0


@pytest.mark.parametrize(
    "cov",
    [
        [[1.0, 2.0], [2.0, 1.0]],  # indefinite
        [[0.0, 0.0], [0.0, 0.0]],
        [[1.0, 0.0], [0.0, -1.0]],
        [[4.0, 1.0], [0.5, 4.0]],  # not symmetric
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        [[float("nan"), 0.0], [0.0, 1.0]],
    ],
)
def test_invalid_covariance_raises(cov: list[list[float]]) -> None:
    with pytest.raises(ValueError):
        ellipse_from_covariance(cov, 0.95)


# ---------------------------------------------------------------- polygons / GeoJSON


def test_ellipse_polygon_enu_shape_and_axes() -> None:
    ell = Ellipse(0.95, 300.0, 100.0, 30.0)
    pts = ellipse_polygon_enu(10.0, -20.0, ell, n_points=72)
    assert pts.shape == (72, 2)
    r = np.hypot(pts[:, 0] - 10.0, pts[:, 1] + 20.0)
    assert r.max() == pytest.approx(300.0)
    assert r.min() == pytest.approx(100.0)
    far = pts[int(np.argmax(r))] - [10.0, -20.0]
    assert math.degrees(math.atan2(far[0], far[1])) % 180.0 == pytest.approx(30.0)
    assert not np.allclose(pts[0], pts[-1])


def test_large_ellipse_ring_matches_semi_axes_geodesically() -> None:
    ell = Ellipse(0.95, 20_000.0, 5_000.0, 30.0)
    center_e, center_n = 56_568.5, 56_568.5  # 80 km north-east of the origin
    ring = ellipse_polygon_lonlat(center_e, center_n, ell, LAT0, LON0, n_points=72)
    assert len(ring) == 73
    assert ring[0] == ring[-1]
    assert _signed_area(ring) > 0.0  # counter-clockwise in lon/lat

    clat, clon = enu_to_geodetic(center_e, center_n, LAT0, LON0)
    lon = np.array([p[0] for p in ring[:-1]])
    lat = np.array([p[1] for p in ring[:-1]])
    d = geodesic_distance_m(np.full(lat.shape, clat), np.full(lon.shape, clon), lat, lon)
    assert d.max() == pytest.approx(20_000.0, rel=0.01)
    assert d.min() == pytest.approx(5_000.0, rel=0.01)
    # Vertex to opposite vertex, halved, is the semi-axis too.
    assert geodesic_distance_m(lat[0], lon[0], lat[36], lon[36]) / 2 == pytest.approx(
        20_000.0, rel=0.01
    )
    assert geodesic_distance_m(lat[18], lon[18], lat[54], lon[54]) / 2 == pytest.approx(
        5_000.0, rel=0.01
    )
    # The far vertex lies along the 30° bearing as seen from the centre.
    east, north = geodetic_to_enu(lat[0], lon[0], clat, clon)
    assert math.degrees(math.atan2(east, north)) == pytest.approx(30.0, abs=1.0)


def test_localization_geojson_structure() -> None:
    cov = covariance_from_params(800.0, 300.0, 0.25)
    ellipses = [ellipse_from_covariance(cov, c, k) for c, k in ((0.68, 1.4), (0.95, 3.2))]
    center = (12_000.0, -7_000.0)
    lat, lon = enu_to_geodetic(*center, LAT0, LON0)
    fc = localization_geojson(lat, lon, ellipses, center, (LAT0, LON0))

    assert fc["type"] == "FeatureCollection"
    assert len(fc["features"]) == 3
    point, *polys = fc["features"]
    assert point["type"] == "Feature"
    assert point["geometry"]["type"] == "Point"
    assert point["properties"] == {"kind": "estimate"}
    assert point["geometry"]["coordinates"] == [round(lon, 7), round(lat, 7)]
    assert 7.0 < point["geometry"]["coordinates"][0] < 9.0  # lon first
    assert 44.0 < point["geometry"]["coordinates"][1] < 46.0

    for feature, ell in zip(polys, ellipses, strict=True):
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        props = feature["properties"]
        assert props["kind"] == "ellipse"
        assert props["confidence"] == ell.confidence
        assert props["semi_major_m"] == pytest.approx(ell.semi_major_m, abs=1e-3)
        assert props["semi_minor_m"] == pytest.approx(ell.semi_minor_m, abs=1e-3)
        assert props["orientation_deg"] == pytest.approx(ell.orientation_deg, abs=1e-3)
        assert props["scale_k"] == ell.scale_k
        (ring,) = feature["geometry"]["coordinates"]
        assert ring[0] == ring[-1] and len(ring) == 73
        assert all(len(p) == 2 and 7.0 < p[0] < 9.0 and 44.0 < p[1] < 46.0 for p in ring)
        assert all(p[0] == round(p[0], 7) and p[1] == round(p[1], 7) for p in ring)
        assert _signed_area(ring) > 0.0

    assert [p["properties"]["confidence"] for p in polys] == [0.68, 0.95]
    assert polys[0]["properties"]["semi_major_m"] < polys[1]["properties"]["semi_major_m"]


def test_geojson_ellipse_vertices_lie_on_the_ellipse_at_the_estimate() -> None:
    """Far from the network centre the ring keeps its size in the estimate's own tangent plane."""
    from heimdall.geo import ellipse_from_covariance, geodetic_to_enu, localization_geojson

    lat0, lon0 = 44.966, 8.16
    east, north = 180_000.0, -120_000.0
    lat, lon = enu_to_geodetic(east, north, lat0, lon0)
    cov = np.array([[9e8, 2e8], [2e8, 4e8]])
    ell = ellipse_from_covariance(cov, 0.95)
    doc = localization_geojson(float(lat), float(lon), [ell], (east, north), (lat0, lon0))
    ring = np.array(doc["features"][1]["geometry"]["coordinates"][0])
    e, n = geodetic_to_enu(ring[:, 1], ring[:, 0], float(lat), float(lon))
    r = np.hypot(e, n)
    assert r.max() == pytest.approx(ell.semi_major_m, rel=1e-4)
    assert r.min() == pytest.approx(ell.semi_minor_m, rel=1e-4)
