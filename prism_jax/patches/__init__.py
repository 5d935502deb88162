"""Patches of real images, shared by the selection methods RDED and DPS: random-resized-crop boxes,
crops, stitching several crops into one image (crops.py), and the k-means clustering, cluster
ranking and round-robin fill of DPS (cluster.py)."""
