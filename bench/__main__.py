from .compare import main

main()
