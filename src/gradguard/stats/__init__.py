"""The step recorder's package: what is measured per step and sampled, on the device.

Room: the step recorder. It may touch: no other module.
"""
