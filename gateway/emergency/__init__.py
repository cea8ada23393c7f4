"""Emergencies (EMG-1 to EMG-3): the sealed break-glass credential, the declared
emergency mode with its time bound and its few configured relaxations, and the
report of what was exchanged while it was on."""
