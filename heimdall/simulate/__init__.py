"""Synthetic RF scenes: transmitters, propagation to the receivers, and their IQ.

``propagation`` holds the path-loss laws, terrain, fading and noise;
``scenes`` draws scenes and synthesizes their IQ (FM, CW, FSK, digital voice);
``families`` names the training, calibration and evaluation distributions;
``dataset`` turns scenes into the serving features. Every parameter, its unit
and its range is in :class:`SimulationParams` and docs/simulation.md.
"""

from heimdall.simulate.propagation import SimulationParams
from heimdall.simulate.scenes import SceneBatch, sample_scenes, synthesize_iq

__all__ = ["SceneBatch", "SimulationParams", "sample_scenes", "synthesize_iq"]
