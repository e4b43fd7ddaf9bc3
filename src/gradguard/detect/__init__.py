"""The judge's package: the host history, the detectors and the reporter.

Room: the judge. It may touch: no other module.
"""
