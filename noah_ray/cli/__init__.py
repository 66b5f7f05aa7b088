"""The ``noah-ray`` command (:mod:`.main`) and its import / export handlers (:mod:`.commands`);
``python -m noah_ray.cli`` runs it too.  The top layer: it may import every other.
"""
