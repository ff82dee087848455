-- list_order.lua: included by list.lua and search.lua (`--#include`). The list's order
-- (last activity descending, then id descending) over entries {score, id, ...}, and the
-- first k entries of an array in that order without sorting all of it.

-- a before b in the list's order
local function before(a, b)
  return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2])
end

-- The first k entries of `items`, in order. A page keeps k small: a bounded insertion,
-- O(n) comparisons for most entries (they lose to the k-th at once); a large k (a deep
-- page by number) sorts instead.
local function first_k(items, k)
  if k > 64 then
    table.sort(items, before)
    for i = #items, k + 1, -1 do
      items[i] = nil
    end
    return items
  end
  local top, n = {}, 0
  for _, item in ipairs(items) do
    if n < k or before(item, top[n]) then
      local i = n
      if n < k then
        n = n + 1
      else
        i = n - 1  -- the last one drops out
      end
      while i >= 1 and before(item, top[i]) do
        top[i + 1] = top[i]
        i = i - 1
      end
      top[i + 1] = item
    end
  end
  return top
end
