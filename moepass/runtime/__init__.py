"""What runs after compile: the moepass ops, routing, statistics, calibration, offloading."""
