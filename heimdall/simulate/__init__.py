"""Synthetic RF scenes: transmitters, propagation to the receivers, and their IQ.

``propagation`` computes what each receiver hears (power, SNR, detection),
``signals`` synthesizes the narrowband-FM IQ, ``scenes`` ties them together
into training sets and example requests. Every parameter, its unit and its
default is in :class:`SimulationParams` and docs/simulation.md.
"""

from heimdall.simulate.propagation import SimulationParams
from heimdall.simulate.scenes import SceneBatch, sample_scenes, synthesize_iq

__all__ = ["SceneBatch", "SimulationParams", "sample_scenes", "synthesize_iq"]
