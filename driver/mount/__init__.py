"""Host helpers: mount table, mount/unmount, loop devices, formatting, resizing, freezing."""
