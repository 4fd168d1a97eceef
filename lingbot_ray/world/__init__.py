"""A procedural 3-D world and a dataset of camera-controlled clips rendered in it (numpy only).

``scene`` builds seeded worlds, ``render`` ray-casts them from the poses that
:class:`lingbot_ray.control.camera.CameraTrajectory` integrates from keyboard actions, and ``dataset``
writes and reads sharded clips for training a small world model.
"""
