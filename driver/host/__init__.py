"""Host: the mount table, mount/unmount, loop devices, filesystems and the argv-only exec runner."""
