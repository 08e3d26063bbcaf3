"""The client side of remote members: how this server asks a member served by another one."""
