"""Outputs of a watch folder: plain files (MegaDetector JSON, CSV), Camtrap DP packages, an HTML report."""
