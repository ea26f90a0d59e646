"""What the tests share: the toy model, the one-process simulations of DiLoCo workers and the subprocess launcher."""
