"""The algorithm: ``inpaint`` (the loop, read top to bottom), ``acceleration`` (first-block cache),
``model`` (loading FLUX and attaching a backend), ``safety``, and the test models ``tiny`` (the real
architecture at toy size) and ``random_model`` (full size, random weights). Never imports the front
or the worker.
"""
