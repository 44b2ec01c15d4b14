"""Verification by re-running: comparing a re-made image with the one a worker returned
(issue 13). Pure functions of the images and their determinism class; knows no role."""
