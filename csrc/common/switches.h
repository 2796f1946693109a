// Environment switches, read on every call so that benchmarks can compare both settings in one process
// (benchmarks/README.md names each switch and what it measured).
#pragma once

#include <cstdlib>
#include <cstring>

namespace robbench {

// A default-on switch: on unless the variable is set to "0".
inline bool switch_on(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// A default-off switch: on only when the variable is set to "1".
inline bool switch_set(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

}  // namespace robbench
