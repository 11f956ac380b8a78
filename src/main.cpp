// qlora: parse the command line and hand over; every error is mapped to an
// exit code in one place (src/cli/app.cpp).
#include "qlora/cli/app.h"

int main(int argc, char** argv) { return qlora::cli::run(argc, argv); }
