"""Synthetic data: a FHIR R4 corpus with deliberate quirks (`seed.corpus`) and the demo loader
(`seed.demo.load_demo`) that `recon run` calls on every start."""

from .demo import DEMO_PASSWORD, DemoResult, load_demo

__all__ = ["DEMO_PASSWORD", "DemoResult", "load_demo"]
