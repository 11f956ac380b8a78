# Oniguruma 6.9.10, vendored in third_party/oniguruma (src/ and COPYING as released, tag v6.9.10
# of kkos/oniguruma): the version, and so the Unicode 16.0 property tables, that Hugging Face
# tokenizers bundles. Debian 12's libonig (6.9.8) knows Unicode 14 only, so letters of scripts
# added since would split differently from the tokenizers library. -> qlora_onig (static, C).
enable_language(C)
set(_onig ${CMAKE_CURRENT_SOURCE_DIR}/third_party/oniguruma)
include(CheckIncludeFiles)
include(CheckSymbolExists)
include(CheckTypeSize)
foreach(h alloca.h stdint.h sys/times.h sys/time.h sys/types.h unistd.h inttypes.h)
  string(TOUPPER "HAVE_${h}" _var)
  string(REGEX REPLACE "[/.]" "_" _var "${_var}")
  check_include_files(${h} ${_var})
endforeach()
check_symbol_exists(alloca "alloca.h" HAVE_ALLOCA)
check_type_size(int SIZEOF_INT)
check_type_size(long SIZEOF_LONG)
check_type_size("long long" SIZEOF_LONG_LONG)
check_type_size("void*" SIZEOF_VOIDP)
set(PACKAGE onig)
set(PACKAGE_VERSION 6.9.10)
set(VERSION 6.9.10)
set(USE_CRNL_AS_LINE_TERMINATOR 0)
configure_file(${_onig}/src/config.h.cmake.in ${CMAKE_CURRENT_BINARY_DIR}/oniguruma/config.h)

set(_onig_sources)
foreach(f regerror regparse regext regcomp regexec reggnu regenc regsyntax regtrav regversion st onig_init
          unicode ascii utf8 utf16_be utf16_le utf32_be utf32_le euc_jp sjis iso8859_1 iso8859_2 iso8859_3
          iso8859_4 iso8859_5 iso8859_6 iso8859_7 iso8859_8 iso8859_9 iso8859_10 iso8859_11 iso8859_13
          iso8859_14 iso8859_15 iso8859_16 euc_tw euc_kr big5 gb18030 koi8_r cp1251 euc_jp_prop sjis_prop
          unicode_unfold_key unicode_fold1_key unicode_fold2_key unicode_fold3_key)
  list(APPEND _onig_sources ${_onig}/src/${f}.c)
endforeach()
add_library(qlora_onig STATIC ${_onig_sources})
target_include_directories(qlora_onig SYSTEM PUBLIC ${_onig}/src PRIVATE ${CMAKE_CURRENT_BINARY_DIR}/oniguruma)
target_compile_options(qlora_onig PRIVATE -w)  # third-party C: its warnings are not ours to fix
set_target_properties(qlora_onig PROPERTIES C_STANDARD 99 POSITION_INDEPENDENT_CODE ON)
