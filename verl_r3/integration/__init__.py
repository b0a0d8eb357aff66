"""The verl integration room: code that plugs verl_r3 into verl 0.9 without editing verl.

Depends on the core and the engine patches, never the other way round. Import the
submodules you need (for instance ``verl_r3.integration.cpu_platform``); this package
itself imports nothing heavy.
"""
