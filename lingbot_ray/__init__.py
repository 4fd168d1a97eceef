"""lingbot_ray: realtime serving of camera-controlled video world models on Ray Serve.

Layers (dependencies run one way): ``protocol`` and ``control`` ← ``engine`` ← ``serve``.
``protocol`` and ``transport`` import neither torch nor ray.
"""

__version__ = "0.1.0"
