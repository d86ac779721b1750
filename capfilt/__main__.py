from capfilt.cli import main

main()
