"""PayMesh's policy chain (client side) and server-side interceptors."""
