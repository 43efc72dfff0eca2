// The figures of an Analysis as JSON: what `tokmix analyze --json` prints per pattern and what
// the Python package returns from tokmix.analyze().
#pragma once
#include <nlohmann/json.hpp>

#include "tokmix/analysis.h"

namespace tokmix {

nlohmann::json to_json(const Analysis& a);

}  // namespace tokmix
