"""Network building blocks, separate from the policies that use them."""
