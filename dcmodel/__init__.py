"""dcmodel: a JAX research framework for the data flow of large-model training and serving in a data center."""
